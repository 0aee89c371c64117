"""Recipes: named YAML files of job settings, bundled with dvl-batch or written by users.

A recipe is what a real annotation job keeps under version control (prompt, system
prompt, conversation turns, generation limits, batching), so that a run is
`dvl-batch run RECIPE -i INPUT -o OUT` and a change of prompt is a reviewed diff.
The bundled ones live in the repository's top-level `recipes/` folder, which the
package ships as `dvl_batch/recipes/` (a link in the source tree, real files in a
wheel); both places are searched so a source checkout and an installed package agree.

This module finds and reads recipe files; config/spec.py turns their settings into a JobSpec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .sections import SECTION_TYPES
from .validate import suggest

RECIPE_SUFFIXES = (".yaml", ".yml")

_RECIPE_META_KEYS = ("name", "description")


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe file and the summary `dvl-batch recipes` shows for it."""

    name: str
    path: Path
    description: str
    task: str


def bundled_recipe_dirs() -> list[Path]:
    """The package's recipes (installed wheel or source link), then the checkout's top level."""
    package = Path(__file__).resolve().parent.parent / "recipes"
    checkout = Path(__file__).resolve().parent.parent.parent / "recipes"
    found: list[Path] = []
    for folder in (package, checkout):
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in found]:
            found.append(folder)
    return found


def _recipe_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder in bundled_recipe_dirs():
        for path in sorted(folder.iterdir()):
            if path.suffix in RECIPE_SUFFIXES and path.is_file():
                files.setdefault(path.stem, path)
    return files


def _summary(path: Path) -> RecipeInfo:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError, RecursionError):  # listed anyway; using it says why not
        data = {}
    data = data if isinstance(data, dict) else {}
    prompt = data.get("prompt") if isinstance(data.get("prompt"), dict) else {}
    task = str(data.get("task") or prompt.get("task") or "caption")
    return RecipeInfo(str(data.get("name") or path.stem), path, str(data.get("description") or "").strip(), task)


def bundled_recipes() -> list[RecipeInfo]:
    """Every bundled recipe, sorted by name."""
    return [_summary(path) for _, path in sorted(_recipe_files().items())]


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file from a path, or from a bundled name like `short-caption`."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    text = str(recipe)
    if path.suffix in RECIPE_SUFFIXES or "/" in text:
        raise UsageError(f"recipe not found: {recipe}")
    files = _recipe_files()
    for candidate in (text, text.replace("_", "-")):
        if candidate in files:
            return files[candidate]
    raise UsageError(f"unknown recipe '{recipe}'{suggest(text, files)}; `dvl-batch recipes` lists the bundled ones, or pass a YAML path")


def _flatten_recipe(recipe: Mapping[str, Any], origin: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for top, value in recipe.items():
        if top in _RECIPE_META_KEYS:
            continue
        if top in SECTION_TYPES:
            if not isinstance(value, Mapping):
                raise UsageError(f"{origin}: section '{top}' must be a mapping of keys")
            for key, inner in value.items():
                flat[f"{top}.{key}"] = inner
        else:
            flat[top] = value
    return flat


def _yaml_problem(exc: Exception) -> str:
    """'mapping values are not allowed here (line 3, column 9)' rather than parser context."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc).splitlines()[0]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a flat {"section.key": value} mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read the recipe {path} ({exc.strerror or exc})") from None
    except RecursionError:
        raise UsageError(f"recipe {path} is nested too deeply to be a recipe") from None
    if not isinstance(data, Mapping):
        raise UsageError(f"recipe {path} must be a mapping of sections")
    if not all(isinstance(key, str) for key in data):
        bad = next(key for key in data if not isinstance(key, str))
        raise UsageError(f"recipe {path}: its keys must be section names, got {bad!r:.40}")
    return _flatten_recipe(data, f"recipe {path.name}")


def read_recipe(recipe: str | Path) -> tuple[dict[str, Any], str]:
    """Flat {"section.key": value} settings of a recipe and the name used in error messages."""
    path = find_recipe(recipe)
    return load_recipe(path), f"recipe {path.name}"
