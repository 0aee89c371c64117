"""Per-shard assembly: the engine's out-of-order answers back into shards, checkpoints and parts.

A sample's rows are kept until all its questions are answered; whole samples are then
saved at least every `output.checkpoint_seconds` as checkpoint files (sink/checkpoints.py),
and a shard's part is written the moment its last answer arrives, folding in its
checkpoints. Rows count as saved (in the stats and the summary) once they are in a
checkpoint or a part.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.types import Completion, EnginePrompt, WorkItem
from ..errors import EXIT_FAILED
from ..records import AnswerRow, PreparedSample, Shard, ShardEnd
from ..sink.checkpoints import source_signature
from ..sink.parts import ParquetSink
from .stats import RunStats

PROGRESS_SECONDS = 1.0  # how often answers (not only finished shards) reach the progress reporters


@dataclass
class _ShardState:
    shard: Shard
    checkpoints: list[Path]  # this shard's checkpoint files (earlier runs' and this run's)
    source: str | None = None  # the input as read (checkpoints.source_signature), written into each checkpoint
    source_known: bool = False  # taken at the first checkpoint: never for shards that finish in between
    rows: list[AnswerRow] = field(default_factory=list)  # whole samples not saved yet
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
    rows: list[AnswerRow] = field(default_factory=list)


class ShardAssembler:
    """Collects each shard's rows; checkpoints whole samples; writes the part when the shard is complete."""

    def __init__(self, sink: ParquetSink, decode: Callable[[list[int]], str], on_progress: Callable[[RunStats], None],
                 checkpoint_seconds: float = 60.0):
        self.sink = sink
        self.decode = decode
        self.on_progress = on_progress
        self.checkpoint_seconds = checkpoint_seconds
        self.states: dict[str, _ShardState] = {}
        self.inflight: dict[int, _Inflight] = {}
        self.stats = RunStats()
        self._next_uid = 0
        self._last_flush = self._last_progress = time.monotonic()
        self.lock = threading.RLock()  # the checkpoint timer thread flushes while the main thread adds rows
        self._timer_error: BaseException | None = None
        self.activity = 0  # stream items and completions seen (the watchdog's measure of progress)

    def checkpointing(self) -> contextlib.AbstractContextManager[None]:
        """A timer thread saves answered rows every `checkpoint_seconds`, even while the
        engine yields nothing for a while (checkpoints are plain files: no pyarrow in it)."""

        def timer(done: threading.Event) -> None:
            while not done.wait(min(3600.0, max(0.02, self.checkpoint_seconds - (time.monotonic() - self._last_flush)))):
                try:
                    with self.lock:
                        if time.monotonic() - self._last_flush >= self.checkpoint_seconds:
                            self._flush_rows()
                except BaseException as exc:  # noqa: BLE001 - raised in the main thread by tick()
                    self._timer_error = exc
                    return

        return _in_background(timer, "dvl-checkpoints", join_seconds=30)

    def _state(self, shard: Shard) -> _ShardState:
        if shard.id not in self.states:
            checkpoints = self.sink.checkpoints  # None: a sink that takes whole shards only (Ray Data batches)
            self.states[shard.id] = _ShardState(shard, checkpoints.files(shard.id) if checkpoints else [])
        return self.states[shard.id]

    def watchdog(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """End the process when neither decoders nor the device deliver anything for `seconds`
        (a wedged library, a dead mount): answered rows are saved, one line says why, exit 1.
        A hung main thread cannot be trusted to unwind, so this thread ends the process."""
        if seconds <= 0:
            return contextlib.nullcontext()

        def watch(done: threading.Event) -> None:
            seen, since = self.activity, time.monotonic()
            while not done.wait(min(5.0, seconds / 4)):
                if self.activity != seen:
                    seen, since = self.activity, time.monotonic()
                elif time.monotonic() - since >= seconds:
                    if self.lock.acquire(timeout=10):
                        with contextlib.suppress(Exception):
                            self._flush_rows()
                    print(f"error: no progress for {seconds:g} s (neither the decoders nor the device delivered "
                          "anything); answered rows are saved, rerun to resume (see --watchdog-seconds)",
                          file=sys.stderr, flush=True)
                    os._exit(EXIT_FAILED)

        return _in_background(watch, "dvl-watchdog")

    def add_sample(self, sample: PreparedSample, shard: Shard, force_eos: Callable[[str, int], int | None] | None = None):
        """Record a sample; returns its WorkItem, or None when every row is already an error."""
        with self.lock:
            return self._add_sample(sample, shard, force_eos)

    def _add_sample(self, sample: PreparedSample, shard: Shard, force_eos: Callable[[str, int], int | None] | None):
        state = self._state(shard)
        state.samples += 1
        self.stats.samples += 1
        if self.stats.samples == 1:  # the engine is loaded and taking samples: progress starts its clock now
            self.on_progress(self.stats)
        prompts: list[EnginePrompt] = []
        rows: list[AnswerRow] = []
        for q_index, request in enumerate(sample.requests):
            error = sample.error or request.error
            if error:
                rows.append(AnswerRow(sample.key, shard.id, sample.index, q_index, request.question, None,
                                      len(request.input_ids), 0, "error", error))
                continue
            force = force_eos(sample.key, q_index) if force_eos else None
            prompts.append(EnginePrompt(q_index, request.input_ids, request.prefix_len, force))
        if not prompts:
            state.rows.extend(rows)
            self._answered(sample.n_images)
            return None
        uid = self._next_uid
        self._next_uid += 1
        questions = [r.question for r in sample.requests]
        self.inflight[uid] = _Inflight(shard.id, sample.key, sample.index, questions, len(prompts), sample.n_images, rows)
        state.outstanding += len(prompts)
        return WorkItem(uid, {name: torch.from_numpy(array) for name, array in sample.pixels.items()}, prompts)

    def add_completion(self, done: Completion) -> None:
        with self.lock:
            self._add_completion(done)
        self.tick()

    def _add_completion(self, done: Completion) -> None:
        info = self.inflight[done.uid]
        state = self.states[info.shard_id]
        text = None if done.error else self.decode(done.tokens)
        info.rows.append(AnswerRow(info.key, info.shard_id, info.index, done.index, info.questions[done.index],
                                   text, done.prompt_tokens, len(done.tokens), done.finish_reason, done.error))
        self.stats.generated_tokens += len(done.tokens)
        self.stats.answers += 1
        state.outstanding -= 1
        info.remaining -= 1
        if info.remaining == 0:
            del self.inflight[done.uid]
            state.rows.extend(info.rows)
            self._answered(info.n_images)
        self._maybe_write(state)

    def end_shard(self, end: ShardEnd) -> None:
        with self.lock:
            state = self._state(end.shard)
            state.end = end
            self.stats.duplicate_keys += end.duplicate_keys
            self._maybe_write(state)

    def _answered(self, n_images: int) -> None:
        """A sample has all its rows: progress counts it and its images."""
        self.stats.answered += 1
        self.stats.images += n_images
        if self.stats.answered == 1:  # the first answer shows at once that the job moves
            self._last_progress = time.monotonic()
            self.on_progress(self.stats)

    def tick(self) -> None:
        """Main thread: checkpoint when the interval is up (the timer may have); report answers now and then."""
        self.activity += 1
        if self._timer_error is not None:
            error, self._timer_error = self._timer_error, None
            raise error
        now = time.monotonic()
        if now - self._last_flush >= self.checkpoint_seconds:
            self.flush()
        elif now - self._last_progress >= PROGRESS_SECONDS:
            self._last_progress = now
            self.on_progress(self.stats)

    def flush(self) -> None:
        """Save every whole sample answered so far: a checkpoint per shard that has new rows."""
        with self.lock:
            self._flush_rows()
        self._last_progress = time.monotonic()
        self.on_progress(self.stats)

    def _flush_rows(self) -> None:
        self._last_flush = time.monotonic()
        for state in list(self.states.values()):
            self._checkpoint(state)

    def _checkpoint(self, state: _ShardState) -> None:
        if not state.rows:
            return
        seq = 1 + max((int(p.name.rsplit(".ckpt", 1)[1].split(".")[0]) for p in state.checkpoints), default=0)
        if not state.source_known:
            state.source, state.source_known = source_signature(state.shard), True
        state.checkpoints.append(self.sink.checkpoints.write(state.shard.id, seq, state.rows, state.source))
        self._count_saved(state.rows)
        state.rows = []

    def _count_saved(self, rows: list[AnswerRow]) -> None:
        self.stats.rows += len(rows)
        self.stats.error_rows += sum(row.error is not None for row in rows)

    def _maybe_write(self, state: _ShardState) -> None:
        if state.end is None or state.outstanding:
            return
        if state.end.unreadable:  # keep what was answered; the shard stays open for the next run
            self._checkpoint(state)
            del self.states[state.shard.id]
            self.stats.unreadable.append(f"{state.shard.url}: {state.end.message}")
            self.on_progress(self.stats)
            return
        self._write(state, None)

    def _write(self, state: _ShardState, note: str | None) -> None:
        self.sink.write(state.shard, state.end, state.rows, note, checkpoints=state.checkpoints)
        self._count_saved(state.rows)
        del self.states[state.shard.id]
        self.stats.shards_written += 1
        self.stats.shards_partial += bool(state.end is None or state.end.partial)
        self.on_progress(self.stats)

    def close_incomplete(self, note: str) -> None:
        """After --limit: write shards cut short (marked partial); drop ones with no rows."""
        with self.lock:
            self._close_incomplete(note)

    def _close_incomplete(self, note: str) -> None:
        for state in list(self.states.values()):
            if state.outstanding:
                continue
            if state.rows or state.checkpoints:
                self._write(state, note)
            else:
                del self.states[state.shard.id]


@contextlib.contextmanager
def _in_background(loop: Callable[[threading.Event], None], name: str, join_seconds: float | None = None) -> Iterator[None]:
    """Run `loop(done)` in a daemon thread for the duration of the block; `done` is set at its end."""
    done = threading.Event()
    thread = threading.Thread(target=loop, args=(done,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        if join_seconds is not None:
            thread.join(timeout=join_seconds)
