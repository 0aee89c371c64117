"""What a run counts, and how it is told to stop.

Kept free of torch and of the stages, so the run's front (`session`, `progress`, the
runners' schedulers) imports them without the ML stack: a run with nothing left to do
exits in about a second instead of first importing torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunStats:
    """What a worker did; summed across workers for the summary and progress.json."""

    shards_written: int = 0
    shards_partial: int = 0
    decoder_restarts: int = 0  # decoder processes that died and were replaced
    duplicate_keys: int = 0  # samples whose key was taken already in their shard (renamed KEY#N)
    samples: int = 0  # samples taken from the inputs
    answered: int = 0  # samples with every row answered (saved or about to be)
    images: int = 0  # images of the answered samples
    rows: int = 0  # rows saved (in a part or a checkpoint) by this run
    error_rows: int = 0  # of those, rows with an error
    answers: int = 0  # rows answered by this run, saved or not yet
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    seconds: float = 0.0
    first_sample_seconds: float = 0.0  # from the run's start until the engine pulled its first sample (decoder start-up)
    engine: dict[str, float] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  # "shard: why" for shards left undone (no part)

    def add(self, other: RunStats) -> None:
        for name in ("shards_written", "shards_partial", "decoder_restarts", "duplicate_keys", "samples", "answered",
                     "images", "rows", "error_rows", "answers", "generated_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.decode_seconds += other.decode_seconds
        self.first_sample_seconds = max(self.first_sample_seconds, other.first_sample_seconds)
        self.unreadable = [*self.unreadable, *other.unreadable]
        for key, value in other.engine.items():
            self.engine[key] = self.engine.get(key, 0) + value


@dataclass
class StopFlag:
    """Set by a signal handler: stop taking new samples, finish what is in flight."""

    requested: bool = False
    reason: str = ""
