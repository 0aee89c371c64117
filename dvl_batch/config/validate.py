"""Checking and converting settings: recipe/CLI values against the section types, then the whole spec.

Every mistake becomes one `UsageError` line that names the key and, where it can, the
closest valid name.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

from ..errors import UsageError
from .sections import (
    ATTN_IMPLEMENTATIONS,
    DEVICE_MAPS,
    DEVICE_PATTERN,
    DTYPES,
    ENGINES,
    GPUS_PATTERN,
    KV_DTYPES,
    QUANTIZE,
    RUNNERS,
    SECTION_TYPES,
    TASKS,
    TURN_ROLES,
)

Spec = TypeVar("Spec")  # a JobSpec, not imported: this module sits below config/spec.py

_TOP_LEVEL_SHORTCUTS = {"task": "prompt.task"}


MAX_COUNT = 1_000_000  # batch sizes, token counts: past this a value is a typo, not a plan (and would be allocated)
MAX_DECODERS = 1024  # decoder processes: each is a fork of this process
MAX_PREFETCH = 1024  # prepared samples queued per decoder: each holds an image's pixels in memory
MAX_RETRIES = 100  # read retries of a shard, with a backoff that doubles each time
_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 6, 6, 6, 6
_SHORT.maxstring = _SHORT.maxother = 80


def _shown(value: Any, limit: int = 120) -> str:
    """A value for an error line: a bounded repr (the full repr of a YAML anchor bomb is gigabytes)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """The hint " (did you mean 'X'?)" naming the closest of `choices`, or nothing."""
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
        raise UsageError(f"{where}: {_shown(value)} is not a valid value")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {_shown(value)}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, where) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UsageError(f"{where}: expected true/false, got {_shown(value)}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UsageError(f"{where}: expected an integer, got {_shown(value)}")
        try:
            return int(value)
        except ValueError as exc:
            raise UsageError(f"{where}: expected an integer, got {_shown(value)}") from exc
    if annotation is float:
        if isinstance(value, bool):
            raise UsageError(f"{where}: expected a number, got {_shown(value)}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: expected a number, got {_shown(value)}") from exc
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UsageError(f"{where}: expected text, got {_shown(value)}")
        return str(value)
    return value


def _section_hints(section_type: type) -> dict[str, Any]:
    return typing.get_type_hints(section_type)


def apply_setting(spec: Spec, dotted: str, value: Any, origin: str) -> Spec:
    dotted = _TOP_LEVEL_SHORTCUTS.get(dotted, dotted)
    if "." not in dotted:
        raise UsageError(f"{origin}: unknown key '{dotted}'{suggest(dotted, SECTION_TYPES)}")
    section_name, key = dotted.split(".", 1)
    if section_name not in SECTION_TYPES:
        raise UsageError(f"{origin}: unknown section '{section_name}'{suggest(section_name, SECTION_TYPES)}")
    section = getattr(spec, section_name)
    hints = _section_hints(SECTION_TYPES[section_name])
    if key not in hints:
        raise UsageError(f"{origin}: unknown key '{section_name}.{key}'{suggest(key, hints)}")
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
        raise UsageError(f"{where}: expected a list of turns like {{role: user, content: TEXT}}, got {_shown(value)}")
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
        _check(role in TURN_ROLES, f"prompt.turns: turn {number} has role '{role}'; use user or assistant{suggest(role, TURN_ROLES)} (system text goes in prompt.system_prompt)")
        expected = TURN_ROLES[(number - 1) % 2]
        _check(role == expected, f"prompt.turns: turn {number} must be a {expected} turn (turns alternate user, assistant)")
    _check(not turns or turns[-1][0] == "assistant", "prompt.turns must end with an assistant turn: the question is the final user turn")



def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def validate(spec: Any) -> None:
    """Reject impossible settings with one clear line each, before any work starts."""
    p, g, d, b, m, r = spec.prompt, spec.generation, spec.data, spec.batch, spec.model, spec.run
    _check(p.task in TASKS, f"prompt.task must be one of {', '.join(TASKS)}, got '{p.task}'")
    if p.task == "vqa":
        _check(
            bool(p.questions or p.questions_file or p.question_field),
            "vqa needs questions: --question TEXT, --questions-file FILE or --question-field NAME",
        )
    _check(p.task != "caption" or bool(p.prompt.strip()), "prompt.prompt must not be empty")
    if p.task == "caption":
        given = [name for name, value in (("questions", p.questions), ("questions_file", p.questions_file),
                                          ("question_field", p.question_field)) if value]
        _check(
            not given,
            f"caption asks only its prompt, so prompt.{given[0] if given else ''} would be ignored: use "
            "`dvl-batch vqa` (or `dvl-batch run RECIPE` for a vqa recipe), or leave the questions out",
        )
    _check_turns(p.turns)
    _check(
        p.max_prompt_tokens is None or p.max_prompt_tokens >= 1,
        f"prompt.max_prompt_tokens must be >= 1, got {p.max_prompt_tokens}",
    )
    _check(1 <= g.max_new_tokens <= MAX_COUNT, f"generation.max_new_tokens must be in 1..{MAX_COUNT}, got {g.max_new_tokens}")
    _check(math.isfinite(g.temperature) and g.temperature >= 0, f"generation.temperature must be >= 0 and finite, got {g.temperature}")
    _check(0 <= g.seed < 2**63, f"generation.seed must be in 0..2**63-1, got {_shown(g.seed)}")
    _check(0 < g.top_p <= 1, f"generation.top_p must be in (0, 1], got {g.top_p}")
    _check(d.workers is None or 0 <= d.workers <= MAX_DECODERS,
           f"data.workers must be in 0..{MAX_DECODERS}, got {_shown(d.workers)}")
    _check(1 <= d.prefetch <= MAX_PREFETCH, f"data.prefetch must be in 1..{MAX_PREFETCH}, got {_shown(d.prefetch)}")
    _check(d.limit is None or d.limit >= 1, f"data.limit must be >= 1, got {d.limit}")
    _check(0 <= d.read_retries <= MAX_RETRIES, f"data.read_retries must be in 0..{MAX_RETRIES}, got {_shown(d.read_retries)}")
    _check(spec.output.checkpoint_seconds > 0,
           f"output.checkpoint_seconds must be > 0, got {spec.output.checkpoint_seconds}")
    _check(r.watchdog_seconds >= 0, f"run.watchdog_seconds must be >= 0 (0: no watchdog), got {r.watchdog_seconds}")
    _check(d.shard_size >= 1, f"data.shard_size must be >= 1, got {d.shard_size}")
    _check(d.max_image_pixels >= 1, f"data.max_image_pixels must be >= 1, got {d.max_image_pixels}")
    _check(d.max_file_bytes >= 1, f"data.max_file_bytes must be >= 1, got {d.max_file_bytes}")
    _check(b.engine in ENGINES, f"batch.engine must be one of {', '.join(ENGINES)}, got '{b.engine}'")
    _check(b.compile in (True, False, "auto"), f"batch.compile must be auto, true or false, got '{b.compile}'")
    for name in ("batch_size", "token_budget", "prefill_batch"):
        value = getattr(b, name)
        _check(value is None or 1 <= value <= MAX_COUNT, f"batch.{name} must be in 1..{MAX_COUNT}, got {_shown(value)}")
    _check(m.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got '{m.dtype}'")
    _check(
        bool(DEVICE_PATTERN.fullmatch(m.device.strip().lower())),
        f"--device (model.device) must be auto, cpu, cuda or cuda:N (or mps), got '{m.device}'",
    )
    _check(m.quantize in QUANTIZE, f"model.quantize must be one of {', '.join(QUANTIZE)}, got '{m.quantize}'")
    _check(m.kv_dtype in KV_DTYPES, f"model.kv_dtype must be one of {', '.join(KV_DTYPES)}, got '{m.kv_dtype}'")
    _check(
        m.kv_dtype == "auto" or b.engine != "generate",
        "--kv-dtype fp8 needs the slot engine (--engine continuous or auto); generate keeps its own cache",
    )
    _check(bool(m.name.strip()), "model.name must not be empty")
    _check(
        m.attn_implementation in ATTN_IMPLEMENTATIONS,
        f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got '{m.attn_implementation}'"
        + suggest(m.attn_implementation, ATTN_IMPLEMENTATIONS),
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
    world_size = 1 if r.world_size is None else r.world_size  # None: the launcher's, checked once known
    _check(1 <= world_size <= MAX_COUNT, f"run.world_size must be in 1..{MAX_COUNT}, got {_shown(r.world_size)}")
    _check(r.rank is None or 0 <= r.rank < world_size, f"run.rank must be in [0, {world_size}), got {r.rank}")
