"""The device-side pipeline: prepared samples -> engine -> finished shards -> sink.

`process_shards` is what one device worker runs for the shards its runner hands it.
It feeds the engine lazily from the preprocessing stream and hands the engine's
out-of-order completions to the assembler (assembly.py: checkpoints, parts). Samples
that failed before the engine become error rows directly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config.spec import JobSpec
from ..engine.types import Engine, WorkItem
from ..preprocess.decoder_pool import DecoderFailure, DecoderRestart
from ..preprocess.preparer import SamplePreparer
from ..preprocess.stream import prepared_stream
from ..records import ShardEnd
from ..sink.parts import ParquetSink
from .assembly import ShardAssembler
from .feed import ShardFeed
from .stats import RunStats, StopFlag

__all__ = ["RunStats", "ShardAssembler", "StopFlag", "process_shards"]


def _work_items(
    stream: Iterator[Any], assembler: ShardAssembler, feed: ShardFeed, limit: int | None, stop: StopFlag,
    force_eos: Callable[[str, int], int | None] | None,
) -> Iterator[WorkItem]:
    for item in stream:
        assembler.tick()
        if isinstance(item, ShardEnd):
            assembler.end_shard(item)
            continue
        if isinstance(item, DecoderFailure):
            feed.close()
            raise item.error()
        if isinstance(item, DecoderRestart):
            assembler.stats.decoder_restarts += 1
            continue
        if stop.requested or (limit is not None and assembler.stats.samples >= limit):
            feed.close()
            return
        work = assembler.add_sample(item, feed.by_id[item.shard_id], force_eos)
        if work is not None:
            yield work


def _timing_first(items: Iterator[WorkItem], started: float, stats: RunStats) -> Iterator[WorkItem]:
    """`items`, noting when the first one arrived: the decoders' start-up, which the device
    spends idle (forking the pool, reading the first shard, preparing the first sample)."""
    for item in items:
        if not stats.first_sample_seconds:
            stats.first_sample_seconds = time.perf_counter() - started
        yield item


def _answer_all(engine: Engine, items: Iterator[WorkItem], assembler: ShardAssembler, spec: JobSpec,
                stop: StopFlag) -> None:
    """Run the engine over `items` and save every whole sample it answered, also when it fails."""
    try:
        with assembler.checkpointing(), assembler.watchdog(spec.run.watchdog_seconds):
            for completion in engine.run(items):
                assembler.add_completion(completion)
    except Exception:  # a failed run still keeps every whole sample it answered (not a second Ctrl-C)
        with contextlib.suppress(Exception):
            assembler.flush()
        raise
    if spec.data.limit is not None and not stop.requested:
        assembler.close_incomplete(f"stopped by --limit {spec.data.limit}")
    assembler.flush()  # a stop, or shards left open: what was answered is saved, the rest is redone next run


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
    assembler = ShardAssembler(sink, decode, on_progress, spec.output.checkpoint_seconds)
    stream = prepared_stream(spec, SamplePreparer(spec, model_path, processor), feed)
    items = _timing_first(_work_items(stream, assembler, feed, spec.data.limit, stop, force_eos), started, assembler.stats)
    try:
        _answer_all(engine, items, assembler, spec, stop)
    finally:
        # Shut the decoder processes down now, after what was answered is saved: they ignore
        # SIGTERM (stream.py), so one left to the interpreter's exit would be joined forever
        # after an unexpected error.
        stream.close()
    stats = assembler.stats
    stats.seconds = time.perf_counter() - started
    stats.engine = engine.stats.as_dict()
    stats.decode_seconds = engine.stats.decode_seconds
    if torch.cuda.is_available():
        stats.engine["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return stats
