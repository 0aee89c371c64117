"""The job specification: one frozen object built from a YAML recipe plus CLI overrides.

Every stage receives the `JobSpec` (or the section it needs) as an argument; nothing
deeper reads globals or environment variables. That makes a run reproducible from
`OUT/job.json` alone, and lets resume decide whether a rerun is "the same job" by
comparing the fingerprint of the sections that change outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UsageError

TASKS = ("caption", "vqa")
ENGINES = ("auto", "continuous", "generate")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZE = ("none", "int4wo", "int8wo", "int8dq", "fp8")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
TURN_ROLES = ("user", "assistant")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
RUNNERS = ("local", "ray")
# run.gpus: "all", or a comma list of GPU indices ("0,1"), "cuda:N" or "cpu" (one engine per entry)
GPUS_PATTERN = re.compile(r"all|(cpu|\d+|cuda:\d+)(,(cpu|\d+|cuda:\d+))*")
DEFAULT_CAPTION_PROMPT = "Describe this image."


@dataclass(frozen=True)
class ModelSpec:
    """Which checkpoint, on which device, in which precision."""

    name: str = "auto"  # hub id, local dir, "tiny", "tiny-hybrid", or "auto" (real if reachable, else tiny)
    revision: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    attn_implementation: str = "sdpa"
    quantize: str = "none"
    device_map: str | None = None  # "auto" spreads a too-large model over GPUs (generate engine)
    cache_dir: str | None = None  # where offline tiny models are built and kept


@dataclass(frozen=True)
class PromptSpec:
    """What to ask about each image."""

    task: str = "caption"
    prompt: str = DEFAULT_CAPTION_PROMPT
    questions: tuple[str, ...] = ()
    questions_file: str | None = None  # JSONL/CSV keyed by image key
    question_field: str | None = None  # a text field/column of the input holding the question
    system_prompt: str | None = None  # None: the checkpoint's own system prompt
    turns: tuple[tuple[str, str], ...] = ()  # (role, text) turns before the question: few-shot, earlier chat
    max_prompt_tokens: int | None = None  # cut question text (never image tokens) to fit; None: no limit


@dataclass(frozen=True)
class GenerationSpec:
    """Decoding parameters; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    """Where samples come from and how they are decoded."""

    inputs: tuple[str, ...] = ()
    image_field: str | None = None  # auto-detected when None
    key_field: str | None = None  # parquet column holding the sample key
    workers: int | None = None  # preprocessing processes; None: from the CPU count
    prefetch: int = 32  # samples buffered per worker
    fast_decode: bool = True  # JPEG draft decoding + normalisation on the device
    max_image_pixels: int = 89_478_485  # larger images become error rows (decompression bombs)
    limit: int | None = None  # stop after this many samples (smoke tests)
    shard_size: int = 1000  # images per shard for plain folders


@dataclass(frozen=True)
class BatchSpec:
    """How requests are grouped on the device."""

    engine: str = "auto"  # continuous (slot scheduler) or generate (transformers' generate)
    batch_size: int | None = None  # concurrent sequences; None: fit to device memory
    token_budget: int | None = None  # cap on prompt tokens per prefill batch
    prefill_batch: int | None = None  # images per prefill step; None: automatic
    cuda_graphs: bool = True
    compile: bool = True  # torch.compile the slot engine's passes (CUDA only)
    triton_attention: bool = True  # Triton decode attention reading only valid keys (CUDA only)
    phase_timing: bool = False  # synchronise to time vision/prefill phases (diagnosis; slower)


@dataclass(frozen=True)
class OutputSpec:
    """Where results go and how a rerun treats existing results."""

    path: str = ""
    overwrite: bool = False
    strict: bool = False  # exit code 4 when any row has an error


@dataclass(frozen=True)
class RunSpec:
    """How shards are scheduled; never changes what a row contains."""

    runner: str = "local"
    gpus: str | None = None  # None: one device (model.device); "all" or "0,1,3"
    rank: int = 0
    world_size: int = 1
    ray_address: str | None = None
    progress: bool = True


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
        from .recipebook import spec_from_recipe

        return spec_from_recipe(recipe, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_identity(self, resolved_model: str) -> dict[str, Any]:
        """The settings that change what a row says; a rerun must match them to resume."""
        return {
            "model": resolved_model,
            "revision": self.model.revision,
            "dtype": self.model.dtype,
            "quantize": self.model.quantize,
            "prompt": dataclasses.asdict(self.prompt),
            "generation": dataclasses.asdict(self.generation),
            "fast_decode": self.data.fast_decode,
            "max_image_pixels": self.data.max_image_pixels,
            "limit": self.data.limit,
        }

    def fingerprint(self, resolved_model: str) -> str:
        blob = json.dumps(self.output_identity(resolved_model), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_SECTION_TYPES = {
    "model": ModelSpec,
    "prompt": PromptSpec,
    "generation": GenerationSpec,
    "data": DataSpec,
    "batch": BatchSpec,
    "output": OutputSpec,
    "run": RunSpec,
}
_RECIPE_META_KEYS = ("name", "description")
_TOP_LEVEL_SHORTCUTS = {"task": "prompt.task"}


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert one recipe/CLI value against its dataclass annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UsageError:
                continue
        raise UsageError(f"{where}: {value!r} is not a valid value")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, where) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UsageError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as exc:
            raise UsageError(f"{where}: expected an integer, got {value!r}") from exc
    if annotation is float:
        if isinstance(value, bool):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: expected a number, got {value!r}") from exc
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UsageError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _section_hints(section_type: type) -> dict[str, Any]:
    return typing.get_type_hints(section_type)


def _apply(spec: JobSpec, dotted: str, value: Any, origin: str) -> JobSpec:
    dotted = _TOP_LEVEL_SHORTCUTS.get(dotted, dotted)
    if "." not in dotted:
        raise UsageError(f"{origin}: unknown key '{dotted}'{_suggest(dotted, _SECTION_TYPES)}")
    section_name, key = dotted.split(".", 1)
    if section_name not in _SECTION_TYPES:
        raise UsageError(f"{origin}: unknown section '{section_name}'{_suggest(section_name, _SECTION_TYPES)}")
    section = getattr(spec, section_name)
    hints = _section_hints(_SECTION_TYPES[section_name])
    if key not in hints:
        raise UsageError(f"{origin}: unknown key '{section_name}.{key}'{_suggest(key, hints)}")
    if (section_name, key) == ("prompt", "turns"):
        value = turns_from_recipe(value, f"{origin}: prompt.turns")
    coerced = _coerce(value, hints[key], f"{origin}: {section_name}.{key}")
    return replace(spec, **{section_name: replace(section, **{key: coerced})})


def turns_from_recipe(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """Conversation turns as (role, text) pairs.

    Recipes write them as `{role: user, content: ...}` mappings, or as one mapping per
    exchange `{user: ..., assistant: ...}`; job.json stores `[role, text]` pairs.
    """
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{where}: expected a list of turns like {{role: user, content: TEXT}}, got {value!r}")
    turns: list[tuple[str, str]] = []
    for number, turn in enumerate(value, 1):
        if isinstance(turn, Mapping) and "role" in turn:
            text = turn.get("content", turn.get("text"))
            pairs = [(turn["role"], text)]
        elif isinstance(turn, Mapping) and turn and set(turn) <= set(TURN_ROLES):
            pairs = [(role, turn[role]) for role in TURN_ROLES if role in turn]
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            pairs = [(turn[0], turn[1])]
        else:
            raise UsageError(f"{where}: turn {number} must be {{role: user|assistant, content: TEXT}}, got {turn!r}")
        for role, text in pairs:
            if not isinstance(role, str) or not isinstance(text, str):
                raise UsageError(f"{where}: turn {number} needs a role and a text, got {turn!r}")
            turns.append((role.strip().lower(), text))
    return tuple(turns)


def _check_turns(turns: tuple[tuple[str, str], ...]) -> None:
    """Earlier turns alternate user/assistant and end with the assistant: the question comes next."""
    for number, (role, text) in enumerate(turns, 1):
        _check(bool(text.strip()), f"prompt.turns: turn {number} has no text")
        _check(role in TURN_ROLES, f"prompt.turns: turn {number} has role '{role}'; use user or assistant{_suggest(role, TURN_ROLES)} (system text goes in prompt.system_prompt)")
        expected = TURN_ROLES[(number - 1) % 2]
        _check(role == expected, f"prompt.turns: turn {number} must be a {expected} turn (turns alternate user, assistant)")
    _check(not turns or turns[-1][0] == "assistant", "prompt.turns must end with an assistant turn: the question is the final user turn")


def _flatten_recipe(recipe: Mapping[str, Any], origin: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for top, value in recipe.items():
        if top in _RECIPE_META_KEYS:
            continue
        if top in _SECTION_TYPES:
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(data, Mapping):
        raise UsageError(f"recipe {path} must be a mapping of sections")
    return _flatten_recipe(data, f"recipe {path.name}")


def build_job_spec(
    recipe: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    recipe_origin: str = "recipe",
) -> JobSpec:
    """Defaults, then the recipe, then CLI overrides (None values are ignored)."""
    spec = JobSpec()
    for dotted, value in (recipe or {}).items():
        spec = _apply(spec, dotted, value, recipe_origin)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        spec = _apply(spec, dotted, value, "option")
    validate(spec)
    return spec


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def validate(spec: JobSpec) -> None:
    """Reject impossible settings with one clear line each, before any work starts."""
    p, g, d, b, m, r = spec.prompt, spec.generation, spec.data, spec.batch, spec.model, spec.run
    _check(p.task in TASKS, f"prompt.task must be one of {', '.join(TASKS)}, got '{p.task}'")
    if p.task == "vqa":
        _check(
            bool(p.questions or p.questions_file or p.question_field),
            "vqa needs questions: --question TEXT, --questions-file FILE or --question-field NAME",
        )
    _check(p.task != "caption" or bool(p.prompt.strip()), "prompt.prompt must not be empty")
    _check_turns(p.turns)
    _check(
        p.max_prompt_tokens is None or p.max_prompt_tokens >= 1,
        f"prompt.max_prompt_tokens must be >= 1, got {p.max_prompt_tokens}",
    )
    _check(g.max_new_tokens >= 1, f"generation.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    _check(g.temperature >= 0, f"generation.temperature must be >= 0, got {g.temperature}")
    _check(0 < g.top_p <= 1, f"generation.top_p must be in (0, 1], got {g.top_p}")
    _check(d.workers is None or d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")
    _check(d.prefetch >= 1, f"data.prefetch must be >= 1, got {d.prefetch}")
    _check(d.limit is None or d.limit >= 1, f"data.limit must be >= 1, got {d.limit}")
    _check(d.shard_size >= 1, f"data.shard_size must be >= 1, got {d.shard_size}")
    _check(d.max_image_pixels >= 1, f"data.max_image_pixels must be >= 1, got {d.max_image_pixels}")
    _check(b.engine in ENGINES, f"batch.engine must be one of {', '.join(ENGINES)}, got '{b.engine}'")
    _check(b.batch_size is None or b.batch_size >= 1, f"batch.batch_size must be >= 1, got {b.batch_size}")
    _check(b.token_budget is None or b.token_budget >= 1, f"batch.token_budget must be >= 1, got {b.token_budget}")
    _check(
        b.prefill_batch is None or b.prefill_batch >= 1, f"batch.prefill_batch must be >= 1, got {b.prefill_batch}"
    )
    _check(m.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got '{m.dtype}'")
    _check(m.quantize in QUANTIZE, f"model.quantize must be one of {', '.join(QUANTIZE)}, got '{m.quantize}'")
    _check(bool(m.name.strip()), "model.name must not be empty")
    _check(
        m.attn_implementation in ATTN_IMPLEMENTATIONS,
        f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got '{m.attn_implementation}'"
        + _suggest(m.attn_implementation, ATTN_IMPLEMENTATIONS),
    )
    _check(
        m.device_map in (None, *DEVICE_MAPS),
        f"model.device_map must be one of {', '.join(DEVICE_MAPS)} (or unset), got '{m.device_map}'",
    )
    _check(r.runner in RUNNERS, f"run.runner must be one of {', '.join(RUNNERS)}, got '{r.runner}'")
    _check(
        r.gpus is None or bool(GPUS_PATTERN.fullmatch(r.gpus.strip().lower().replace(" ", ""))),
        f"run.gpus must be 'all', GPU indices like '0,1', or 'cpu,cpu', got '{r.gpus}'",
    )
    _check(r.world_size >= 1, f"run.world_size must be >= 1, got {r.world_size}")
    _check(0 <= r.rank < r.world_size, f"run.rank must be in [0, {r.world_size}), got {r.rank}")


def spec_from_json(data: Mapping[str, Any]) -> JobSpec:
    """Rebuild a JobSpec from `JobSpec.to_dict()` (job.json, Ray task payloads)."""
    flat = {f"{section}.{key}": value for section, inner in data.items() for key, value in inner.items()}
    return build_job_spec(flat, recipe_origin="job.json")
