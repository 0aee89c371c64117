"""The records that flow between the stages, and nothing else.

    sources ──RawSample/ShardEnd──▶ preprocess ──PreparedSample──▶ engine ──▶ AnswerRow ──▶ sink

A `Shard` is the unit of scheduling and of resume; readers yield `RawSample`s (encoded
bytes and text fields) and one `ShardEnd` per shard; preprocessing turns a RawSample
into a `PreparedSample` (pixels plus one `PromptRequest` per question); the run
assembles the engine's answers into `AnswerRow`s, which the sink writes as one part per
shard. `ShardSupply` is what preprocessing pulls shards from: the run's shard feed.
`ResolvedModel` is the model a job resolved to (weights folder or hub id, and its label).
Every stage may import this module; it imports no stage (and no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights and processor are, and how to name them in outputs."""

    path: str  # argument for from_pretrained
    label: str  # recorded in job.json / parquet metadata
    tiny: bool
    notice: str | None = None  # shown to the user (e.g. "offline: using the tiny model")


@dataclass(frozen=True)
class Shard:
    """One unit of work: its part file is `OUT/parts/<id>.parquet`."""

    id: str
    url: str
    format: str  # "webdataset" | "parquet" | "folder"
    members: tuple[str, ...] = ()  # folder shards: image paths relative to `url`
    # {index: key} of the samples an earlier run already answered and checkpointed
    # (OUT/checkpoints): not answered again, unless the sample read at that index has another
    # key (a pipe: or URL shard whose content changed); its new row then replaces the old one
    skip_keys: Mapping[int, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def skip(self) -> frozenset[int]:
        """The indices of `skip_keys`."""
        return frozenset(self.skip_keys)


@dataclass
class RawSample:
    """A sample as stored: encoded image bytes and text fields, not yet decoded."""

    key: str
    index: int
    images: list[bytes] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    field_names: tuple[str, ...] = ()  # every field/column present (for inspect and error messages)
    image_names: tuple[str, ...] = ()  # the fields the images came from
    source_key: str | None = None  # the key as stored, when `key` had to be made distinct (duplicates)


@dataclass(frozen=True)
class ShardEnd:
    """Sent after a shard's last sample: how many there were and whether it was cut."""

    shard: Shard
    n_samples: int
    partial: bool = False
    message: str | None = None
    duplicate_keys: int = 0  # samples whose stored key was taken already (renamed KEY#N)
    unreadable: bool = False  # the shard could not be read (even after retries): no part, redone next run


@dataclass
class PromptRequest:
    """One (sample, question) pair to generate an answer for."""

    question: str
    input_ids: list[int] = field(default_factory=list)
    prefix_len: int = 0
    error: str | None = None


@dataclass
class PreparedSample:
    """A decoded sample: uint8 (fast) or float (exact) pixels per view, plus its requests."""

    shard_id: str
    key: str
    index: int
    # view name -> [n_images, 3, S, S]; numpy, not torch: a tensor crosses the worker boundary
    # through a file descriptor handshake (~2 ms each), an array in a spill file (preprocess/handoff.py)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    requests: list[PromptRequest] = field(default_factory=list)
    error: str | None = None
    decode_seconds: float = 0.0
    n_images: int = 1  # images the sample carries (error samples too), for progress and the summary


@dataclass
class AnswerRow:
    """One output row: the answer to one question about one sample (or why there is none)."""

    key: str
    shard: str
    sample_index: int
    question_index: int
    question: str
    answer: str | None
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    error: str | None = None


class ShardSupply(Protocol):
    """Where preprocessing takes its shards from (the run's `ShardFeed`)."""

    shards: list[Shard]

    def take(self, claim: Callable[[int], None] | None = None) -> Shard | None: ...

    def close(self) -> None: ...
