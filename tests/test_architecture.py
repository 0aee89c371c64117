"""The package's layout rules, checked from its own imports (parsed, nothing is imported).

Stages follow the data flow: records and errors at the bottom, then config, sources,
preprocess, engine, sink, the run, and the front ends (api, cli, ray_data, inspect,
bench) on top. A module may import its own package and anything below it, never a
stage after it; the runners only schedule shards, so they never reach into sources or
preprocess; and no chain of imports, however lazy, comes back to where it started.
Imports inside `if TYPE_CHECKING:` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dvl_batch"

# rank of each part of dvl_batch (the first name after `dvl_batch.`); lower ranks come first
RANKS = {
    "_version": 0, "errors": 0, "records": 0, "processes": 0,
    "config": 1,
    "sources": 2,
    "preprocess": 3,
    "engine": 4,
    "sink": 5,
    "tiny": 5.5,  # the offline test model: built from preprocess's chat layout, resolved by the run
    "runtime": 6,
}
FRONT_END_RANK = 7  # api, cli, cli_options, ray_data, inspect, bench, the package root
RUNNERS = "dvl_batch.runtime.runners"
RUNNERS_MUST_NOT_IMPORT = ("dvl_batch.sources", "dvl_batch.preprocess")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str) -> str | None:
    """The dvl_batch module a dotted name lands in (the longest prefix that is one)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[tuple[str, int]]:
    """(imported dvl_batch module, line) for each import of `module`."""
    path = MODULES[module]
    return imports_in(path.read_text(), module, path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> set[tuple[str, int]]:
    package = module if is_package else module.rpartition(".")[0]
    found: set[tuple[str, int]] = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            hit = _known(target)
            if hit is not None and hit != module:
                found.add((hit, node.lineno))
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def rank(module: str) -> float:
    parts = module.split(".")
    return RANKS.get(parts[1], FRONT_END_RANK) if len(parts) > 1 else FRONT_END_RANK


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}"


def test_the_rules_see_the_package():
    assert {"dvl_batch.records", "dvl_batch.config.spec", "dvl_batch.runtime.runners.local"} <= set(MODULES)
    assert ("dvl_batch.records", 0) not in GRAPH["dvl_batch.sources.discovery"]
    assert any(target == "dvl_batch.records" for target, _ in GRAPH["dvl_batch.sources.discovery"])


def test_no_stage_imports_a_stage_after_it():
    offences = [
        f"{where(module, line)}: {module} (rank {rank(module)}) imports {target} (rank {rank(target)}), a later stage"
        for module, targets in GRAPH.items()
        for target, line in sorted(targets)
        if rank(target) > rank(module)
    ]
    assert not offences, "imports against the data flow:\n" + "\n".join(offences)


def test_runners_only_schedule_shards():
    offences = [
        f"{where(module, line)}: runner {module} imports {target}"
        for module, targets in GRAPH.items()
        if module.startswith(RUNNERS)
        for target, line in sorted(targets)
        if target.startswith(RUNNERS_MUST_NOT_IMPORT)
    ]
    assert not offences, "runners reach into sources/preprocess (use runtime.feed, runtime.worker, records):\n" + "\n".join(offences)


def _find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target, _ in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_circles():
    cycle = _find_cycle()
    if cycle:
        steps = [
            f"{a} -> {b} ({where(a, min(line for target, line in GRAPH[a] if target == b))})"
            for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        pytest.fail("import circle:\n" + "\n".join(steps))


def test_no_module_over_400_lines():
    long = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in MODULES.values()
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): {long}"


def test_the_rules_catch_an_offence():
    """Relative, lazy and TYPE_CHECKING imports are read as Python would read them."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..records import Shard\n"
        "if TYPE_CHECKING:\n    from ..sink.output import OutputDir\n"
        "def later():\n    from ..runtime.worker import DeviceWorker\n"
    )
    found = {target for target, _ in imports_in(source, "dvl_batch.sources.example")}
    assert found == {"dvl_batch.records", "dvl_batch.runtime.worker"}
    assert rank("dvl_batch.runtime.worker") > rank("dvl_batch.sources.example")
