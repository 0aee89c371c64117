"""The device-side pipeline: prepared samples -> engine -> finished shards -> sink.

`process_shards` is what one device worker runs for the shards its runner hands it.
It feeds the engine lazily from the preprocessing stream and reassembles the
engine's out-of-order completions per shard; a shard is written the moment its last
answer arrives. Samples that failed before the engine become error rows directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.spec import JobSpec
from ..engine.types import Completion, Engine, EnginePrompt, WorkItem
from ..preprocess.decoder_pool import DecoderRestart
from ..preprocess.preparer import SamplePreparer
from ..preprocess.stream import prepared_stream
from ..records import AnswerRow, PreparedSample, Shard, ShardEnd
from ..sink.parts import ParquetSink
from .feed import ShardFeed

PROGRESS_INTERVAL = 0.5  # seconds between progress reports within a shard


@dataclass
class RunStats:
    """What a worker did; summed across workers for the summary and progress.json."""

    shards_written: int = 0
    shards_partial: int = 0
    decoder_restarts: int = 0  # decoder processes that died and were replaced
    duplicate_keys: int = 0  # samples whose key was taken already in their shard (renamed KEY#N)
    samples: int = 0  # samples taken from the inputs
    answered: int = 0  # samples with every row written or waiting only for its shard's part
    images: int = 0  # images of the answered samples
    rows: int = 0
    error_rows: int = 0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    seconds: float = 0.0
    engine: dict[str, float] = field(default_factory=dict)

    def add(self, other: RunStats) -> None:
        for name in ("shards_written", "shards_partial", "decoder_restarts", "duplicate_keys", "samples", "answered",
                     "images", "rows", "error_rows", "generated_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.decode_seconds += other.decode_seconds
        for key, value in other.engine.items():
            self.engine[key] = self.engine.get(key, 0) + value


@dataclass
class _ShardState:
    shard: Shard
    rows: list[AnswerRow] = field(default_factory=list)
    outstanding: int = 0
    end: ShardEnd | None = None
    samples: int = 0


@dataclass
class _Inflight:
    shard_id: str
    key: str
    index: int
    questions: list[str]
    remaining: int
    n_images: int = 1


class ShardAssembler:
    """Collects each shard's rows until the shard is complete, then writes its part."""

    def __init__(self, sink: ParquetSink, decode: Callable[[list[int]], str], on_progress: Callable[[RunStats], None]):
        self.sink = sink
        self.decode = decode
        self.on_progress = on_progress
        self.states: dict[str, _ShardState] = {}
        self.inflight: dict[int, _Inflight] = {}
        self.stats = RunStats()
        self._next_uid = 0
        self._reported = float("-inf")  # the first answered sample is reported at once

    def _answered(self, n_images: int) -> None:
        """A sample has all its rows: progress counts it (at most a few reports a second)."""
        self.stats.answered += 1
        self.stats.images += n_images
        now = time.monotonic()
        if now - self._reported >= PROGRESS_INTERVAL:
            self._reported = now
            self.on_progress(self.stats)

    def _state(self, shard: Shard) -> _ShardState:
        if shard.id not in self.states:
            self.states[shard.id] = _ShardState(shard)
        return self.states[shard.id]

    def add_sample(self, sample: PreparedSample, shard: Shard, force_eos: Callable[[str, int], int | None] | None = None):
        """Record a sample; returns its WorkItem, or None when every row is already an error."""
        state = self._state(shard)
        state.samples += 1
        self.stats.samples += 1
        prompts: list[EnginePrompt] = []
        for q_index, request in enumerate(sample.requests):
            error = sample.error or request.error
            if error:
                self._add_row(state, AnswerRow(sample.key, shard.id, sample.index, q_index, request.question, None,
                                               len(request.input_ids), 0, "error", error))
                continue
            force = force_eos(sample.key, q_index) if force_eos else None
            prompts.append(EnginePrompt(q_index, request.input_ids, request.prefix_len, force))
        if not prompts:
            self._answered(sample.n_images)
            return None
        uid = self._next_uid
        self._next_uid += 1
        questions = [r.question for r in sample.requests]
        self.inflight[uid] = _Inflight(shard.id, sample.key, sample.index, questions, len(prompts), sample.n_images)
        state.outstanding += len(prompts)
        return WorkItem(uid, {name: torch.from_numpy(array) for name, array in sample.pixels.items()}, prompts)

    def add_completion(self, done: Completion) -> None:
        info = self.inflight[done.uid]
        state = self.states[info.shard_id]
        text = None if done.error else self.decode(done.tokens)
        self._add_row(state, AnswerRow(info.key, info.shard_id, info.index, done.index, info.questions[done.index],
                                       text, done.prompt_tokens, len(done.tokens), done.finish_reason, done.error))
        self.stats.generated_tokens += len(done.tokens)
        state.outstanding -= 1
        info.remaining -= 1
        if info.remaining == 0:
            del self.inflight[done.uid]
            self._answered(info.n_images)
        self._maybe_write(state)

    def end_shard(self, end: ShardEnd) -> None:
        state = self._state(end.shard)
        state.end = end
        self.stats.duplicate_keys += end.duplicate_keys
        self._maybe_write(state)

    def _add_row(self, state: _ShardState, row: AnswerRow) -> None:
        state.rows.append(row)
        self.stats.rows += 1
        self.stats.error_rows += row.error is not None

    def _maybe_write(self, state: _ShardState) -> None:
        if state.end is None or state.outstanding:
            return
        self._write(state, None)

    def _write(self, state: _ShardState, note: str | None) -> None:
        self.sink.write(state.shard, state.end, state.rows, note)
        del self.states[state.shard.id]
        self.stats.shards_written += 1
        self.stats.shards_partial += bool(state.end is None or state.end.partial)
        self.on_progress(self.stats)

    def close_incomplete(self, note: str) -> None:
        """After --limit: write shards cut short (marked partial); drop ones with no rows."""
        for state in list(self.states.values()):
            if state.outstanding:
                continue
            if state.rows:
                self._write(state, note)
            else:
                del self.states[state.shard.id]


@dataclass
class StopFlag:
    """Set by a signal handler: stop taking new samples, finish what is in flight."""

    requested: bool = False
    reason: str = ""


def _work_items(
    stream: Iterator[Any], assembler: ShardAssembler, feed: ShardFeed, limit: int | None, stop: StopFlag,
    force_eos: Callable[[str, int], int | None] | None,
) -> Iterator[WorkItem]:
    for item in stream:
        if isinstance(item, ShardEnd):
            assembler.end_shard(item)
            continue
        if isinstance(item, DecoderRestart):
            assembler.stats.decoder_restarts += 1
            continue
        if stop.requested or (limit is not None and assembler.stats.samples >= limit):
            feed.close()
            return
        work = assembler.add_sample(item, feed.by_id[item.shard_id], force_eos)
        if work is not None:
            yield work


def process_shards(
    spec: JobSpec,
    model_path: str,
    engine: Engine,
    sink: ParquetSink,
    feed: ShardFeed,
    decode: Callable[[list[int]], str],
    on_progress: Callable[[RunStats], None] = lambda stats: None,
    stop: StopFlag | None = None,
    force_eos: Callable[[str, int], int | None] | None = None,
    processor=None,
) -> RunStats:
    """Run every shard the feed hands out through preprocess -> engine -> sink.

    `force_eos(key, question_index)` is the benchmark's stop schedule (EOS forced as
    token number N); jobs leave it None. `processor`: the one this process loaded
    (None loads it from `model_path`).
    """
    started = time.perf_counter()
    stop = stop or StopFlag()
    assembler = ShardAssembler(sink, decode, on_progress)
    stream = prepared_stream(spec, SamplePreparer(spec, model_path, processor), feed)
    items = _work_items(stream, assembler, feed, spec.data.limit, stop, force_eos)
    for completion in engine.run(items):
        assembler.add_completion(completion)
    if spec.data.limit is not None and not stop.requested:
        assembler.close_incomplete(f"stopped by --limit {spec.data.limit}")
    stats = assembler.stats
    stats.seconds = time.perf_counter() - started
    stats.engine = engine.stats.as_dict()
    stats.decode_seconds = engine.stats.decode_seconds
    if torch.cuda.is_available():
        stats.engine["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return stats
