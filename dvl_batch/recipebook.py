"""Recipes: named YAML files of job settings, bundled with dvl-batch or written by users.

A recipe is what a real annotation job keeps under version control (prompt, system
prompt, conversation turns, generation limits, batching), so that a run is
`dvl-batch run RECIPE -i INPUT -o OUT` and a change of prompt is a reviewed diff.
The bundled ones live in the repository's top-level `recipes/` folder, which the
package ships as `dvl_batch/recipes/` (a link in the source tree, real files in a
wheel); both places are searched so a source checkout and an installed package agree.

This module also builds a JobSpec from Python with the CLI's option names, which is
how scripts and notebooks use dvl-batch without the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .spec import _SECTION_TYPES, JobSpec, build_job_spec, load_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")

# Python/CLI option names whose JobSpec field is not simply the unique field of that name.
OPTION_ALIASES = {
    "model": "model.name",
    "output": "output.path",
    "inputs": "data.inputs",
    "input": "data.inputs",
    "question": "prompt.questions",
}


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe file and the summary `dvl-batch recipes` shows for it."""

    name: str
    path: Path
    description: str
    task: str


def bundled_recipe_dirs() -> list[Path]:
    """The package's recipes (installed wheel or source link), then the checkout's top level."""
    package = Path(__file__).resolve().parent / "recipes"
    checkout = Path(__file__).resolve().parent.parent / "recipes"
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
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
    close = difflib.get_close_matches(text, list(files), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UsageError(f"unknown recipe '{recipe}'{hint}; `dvl-batch recipes` lists the bundled ones, or pass a YAML path")


def read_recipe(recipe: str | Path) -> tuple[dict[str, Any], str]:
    """Flat {"section.key": value} settings of a recipe and the name used in error messages."""
    path = find_recipe(recipe)
    return load_recipe(path), f"recipe {path.name}"


def _field_paths() -> dict[str, str]:
    """Every JobSpec field by its bare name where that name is unique across sections."""
    seen: dict[str, list[str]] = {}
    for section, section_type in _SECTION_TYPES.items():
        for spec_field in dataclasses.fields(section_type):
            seen.setdefault(spec_field.name, []).append(f"{section}.{spec_field.name}")
    return {name: paths[0] for name, paths in seen.items() if len(paths) == 1}


def option_path(name: str) -> str:
    """The JobSpec field an option name sets: `max_new_tokens` -> `generation.max_new_tokens`."""
    if "." in name:
        return name
    if name in OPTION_ALIASES:
        return OPTION_ALIASES[name]
    fields = _field_paths()
    if name in fields:
        return fields[name]
    close = difflib.get_close_matches(name, [*fields, *OPTION_ALIASES], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UsageError(f"unknown option '{name}'{hint}")


def spec_from_recipe(recipe: str | Path | None = None, **options: Any) -> JobSpec:
    """Defaults, then the recipe (bundled name or path), then `options`; validated.

    Options take the CLI's names with underscores (`inputs`, `output`, `model`,
    `max_new_tokens`, `quantize`, `system_prompt`, `turns`, ...) or dotted field
    paths; None leaves a value as the recipe set it.
    """
    values, origin = read_recipe(recipe) if recipe is not None else ({}, "recipe")
    overrides: dict[str, Any] = {}
    for name, value in options.items():
        if name in ("inputs", "input") and isinstance(value, (str, Path)):
            value = [value]
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)) and name in ("inputs", "input"):
            value = [str(v) for v in value]
        overrides[option_path(name)] = value
    return build_job_spec(values, overrides, recipe_origin=origin)
