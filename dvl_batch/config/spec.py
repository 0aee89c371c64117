"""The job specification and the one way to build it: defaults, then a recipe, then options.

`spec_from_recipe` is the builder the CLI, `dvl_batch.run` callers (through
`JobSpec.from_recipe`) and Ray Data's `ImageAnswerer` share, so all three accept the
same recipe names and option names. A spec is frozen and reproducible from
`OUT/job.json` alone; resume decides whether a rerun is "the same job" by comparing the
fingerprint of the sections that change outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .recipes import read_recipe
from .sections import (
    QUANTIZE_IDENTITY,
    SECTION_TYPES,
    BatchSpec,
    DataSpec,
    GenerationSpec,
    ModelSpec,
    OutputSpec,
    PromptSpec,
    RunSpec,
)
from .validate import apply_setting, suggest, validate

__all__ = [
    "BatchSpec", "DataSpec", "GenerationSpec", "JobSpec", "ModelSpec", "OutputSpec", "PromptSpec", "RunSpec",
    "build_job_spec", "option_path", "spec_from_json", "spec_from_recipe",
]

# Python/CLI option names whose JobSpec field is not simply the unique field of that name.
OPTION_ALIASES = {
    "model": "model.name",
    "output": "output.path",
    "inputs": "data.inputs",
    "input": "data.inputs",
    "question": "prompt.questions",
}
LIST_OPTIONS = ("data.inputs", "prompt.questions")  # an empty list leaves the recipe's value


@dataclass(frozen=True)
class JobSpec:
    """Everything a run needs. Frozen: stages may read it, never change it."""

    model: ModelSpec = field(default_factory=ModelSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    data: DataSpec = field(default_factory=DataSpec)
    batch: BatchSpec = field(default_factory=BatchSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    run: RunSpec = field(default_factory=RunSpec)

    @classmethod
    def from_recipe(cls, recipe: str | Path | None = None, **options: Any) -> JobSpec:
        """A validated spec from a bundled recipe name or YAML path plus overrides.

        `options` use the CLI's names (`inputs`, `output`, `model`, `max_new_tokens`,
        `quantize`, ...) or dotted keys passed as `**{"generation.top_p": 0.9}`.
        """
        return spec_from_recipe(recipe, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_identity(self, resolved_model: str) -> dict[str, Any]:
        """The settings that change what a row says; a rerun must match them to resume."""
        return {
            "model": resolved_model,
            "revision": self.model.revision,
            "dtype": self.model.dtype,
            "quantize": QUANTIZE_IDENTITY.get(self.model.quantize, self.model.quantize),
            "prompt": dataclasses.asdict(self.prompt),
            "generation": dataclasses.asdict(self.generation),
            "fast_decode": self.data.fast_decode,
            "max_image_pixels": self.data.max_image_pixels,
            "limit": self.data.limit,
        } | ({"kv_dtype": self.model.kv_dtype} if self.model.kv_dtype != "auto" else {})  # old jobs keep their fingerprint

    def fingerprint(self, resolved_model: str) -> str:
        blob = json.dumps(self.output_identity(resolved_model), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _field_paths() -> dict[str, str]:
    """Every JobSpec field by its bare name where that name is unique across sections."""
    seen: dict[str, list[str]] = {}
    for section, section_type in SECTION_TYPES.items():
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
    raise UsageError(f"unknown option '{name}'{suggest(name, [*fields, *OPTION_ALIASES])}")


def build_job_spec(
    recipe: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    recipe_origin: str = "recipe",
) -> JobSpec:
    """Defaults, then flat recipe settings, then dotted overrides (None values are ignored); validated."""
    spec = JobSpec()
    for dotted, value in (recipe or {}).items():
        spec = apply_setting(spec, dotted, value, recipe_origin)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        spec = apply_setting(spec, dotted, value, "option")
    validate(spec)
    return spec


def _option_value(path: str, value: Any) -> Any:
    """Paths as text, a single input as a list, an empty list as "not given"."""
    if isinstance(value, Path):
        value = str(value)
    if path in LIST_OPTIONS:
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, (list, tuple)):
            value = [str(v) for v in value] or None
    return value


def spec_from_recipe(recipe: str | Path | None = None, **options: Any) -> JobSpec:
    """Defaults, then the recipe (bundled name or path), then `options`; validated.

    Options take the CLI's names with underscores (`inputs`, `output`, `model`,
    `max_new_tokens`, `quantize`, `system_prompt`, `turns`, ...) or dotted field
    paths; None (and an empty list of inputs or questions) leaves a value as the
    recipe set it.
    """
    values, origin = read_recipe(recipe) if recipe is not None else ({}, "recipe")
    overrides: dict[str, Any] = {}
    for name, value in options.items():
        path = option_path(name)
        overrides[path] = _option_value(path, value)
    return build_job_spec(values, overrides, recipe_origin=origin)


def spec_from_json(data: Mapping[str, Any]) -> JobSpec:
    """Rebuild a JobSpec from `JobSpec.to_dict()` (job.json, Ray task payloads)."""
    flat = {f"{section}.{key}": value for section, inner in data.items() for key, value in inner.items()}
    return build_job_spec(flat, recipe_origin="job.json")
