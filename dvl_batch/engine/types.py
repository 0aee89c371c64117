"""What flows into and out of an engine: work items in, completions out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config.spec import BatchSpec


@dataclass(frozen=True)
class Fusion:
    """Which of the slot engine's own kernel arrangements to use (each measured in BENCHMARKS.md;
    off reproduces transformers' arithmetic for that part, to measure the difference)."""

    # defaults are the job spec's, so an engine built without a spec runs what a job runs
    projections: bool = BatchSpec.fuse_projections  # one product for Q/K/V and one for gate/up (fused_layers.py)
    vision_epilogue: bool = BatchSpec.vision_epilogue  # SigLIP fc1's bias and GELU in the matmul's epilogue (vision_layers.py)

    @classmethod
    def of(cls, batch: BatchSpec) -> Fusion:
        """The choices a job's BatchSpec makes."""
        return cls(projections=batch.fuse_projections, vision_epilogue=batch.vision_epilogue)


@dataclass
class EnginePrompt:
    """One prompt of a work item: its ids and where the image prefix ends."""

    index: int  # question index within the sample
    input_ids: list[int]
    prefix_len: int
    force_eos_after: int | None = None  # benchmark stop schedule: EOS is forced as token number N


@dataclass
class WorkItem:
    """One sample: its pixels (uint8 or already-normalised float) and all its prompts."""

    uid: int
    pixels: dict[str, torch.Tensor]
    prompts: list[EnginePrompt] = field(default_factory=list)


@dataclass
class Completion:
    """The answer to one prompt, as token ids (EOS included when the model stopped)."""

    uid: int
    index: int
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    error: str | None = None


START_SECONDS = ("load_seconds", "compile_seconds", "graph_seconds", "probe_seconds")  # per engine, never summed


@dataclass
class EngineStats:
    """Counters an engine keeps for the summary and the benchmark."""

    prefill_seconds: float = 0.0
    vision_seconds: float = 0.0  # part of prefill: image encoding
    prefix_seconds: float = 0.0  # part of prefill: prefix passes
    decode_seconds: float = 0.0
    idle_seconds: float = 0.0  # waiting for input with nothing to run
    decode_steps: int = 0
    prefill_calls: int = 0
    oom_splits: int = 0
    overlapped_prefills: int = 0  # admissions started after their prefill ran beside decode steps
    generated_tokens: int = 0
    slots: int = 0
    common_tokens: int = 0  # prompt head every row shares (the system prompt), computed once per layout
    # start, wall seconds (what a cron run over a few shards pays): the worker's model load,
    # the slot engine's compile + warm-up, decode-graph capture and prefill memory probe
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    graph_seconds: float = 0.0
    probe_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class Engine(Protocol):
    stats: EngineStats

    def run(self, items: Iterator[WorkItem]) -> Iterator[Completion]:
        """Consume work items lazily, yield completions in any order."""
        ...


@dataclass
class Launched:
    """Tokens in flight (a decode step, or an admission's first tokens).

    They arrive in `host` once `done` has fired; `rows` maps row id -> (the request
    that occupied the row at launch, its index in `host`).
    """

    host: torch.Tensor
    done: torch.cuda.Event | None
    rows: dict

    def tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()
