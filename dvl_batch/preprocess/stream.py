"""The preprocessing stream: shards pulled from the run's feed, prepared in decoder processes.

Decoders pull whole shards from a shared feed (so a fast consumer simply takes more
shards), read them with the sources' readers, prepare every sample (preparer.py) and
hand `PreparedSample`s to the device process through a torch DataLoader (large items
spilled to tmpfs, see handoff.py; dead decoders replaced, see decoder_pool.py). A
sample that fails anywhere here is still sent, with `error` set: the sink must write a
row for it.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..config.launch import default_decoders
from ..config.spec import JobSpec
from ..errors import UsageError
from ..processes import die_with_parent
from ..records import PreparedSample, RawSample, Shard, ShardEnd, ShardSupply
from ..sources import read_shard
from ..sources.formats import shard_error_sample
from .decoder_pool import DecoderFailure, ResumePoint, WorkerSlots, supervised_stream
from .handoff import SpillDir
from .preparer import SamplePreparer


class ShardStream(torch.utils.data.IterableDataset):
    """Iterable over PreparedSample and ShardEnd items, shards pulled from a feed.

    After a decoder died, a fresh pool first finishes the shards that were in flight
    (`resume`, shared out by worker id), then pulls new ones; `slots` tells the
    supervisor which decoder holds which shard.
    """

    def __init__(self, spec: JobSpec, preparer: SamplePreparer, feed: ShardSupply,
                 resume: list[ResumePoint] | None = None, slots: WorkerSlots | None = None):
        super().__init__()
        self.spec, self.preparer, self.feed = spec, preparer, feed
        self.resume, self.slots = list(resume or ()), slots

    def __iter__(self) -> Iterator[PreparedSample | ShardEnd]:
        preparer = self.preparer
        info = torch.utils.data.get_worker_info()
        worker_id, n_workers = (info.id, info.num_workers) if info else (0, 1)
        claim = (lambda index: self.slots.working_on(worker_id, index)) if self.slots else None
        try:
            for point in self.resume[worker_id::n_workers]:
                if claim:
                    claim(self.feed.shards.index(point.shard))
                yield from self._shard_items(preparer, point.shard, worker_id, point)
            while (shard := self.feed.take(claim)) is not None:
                yield from self._shard_items(preparer, shard, worker_id, None)
        except Exception as exc:  # noqa: BLE001 - sent as one line; the device process ends the run
            self.feed.close()
            yield DecoderFailure.of(exc)

    def _shard_items(self, preparer: SamplePreparer, shard: Shard, worker_id: int, resume: ResumePoint | None):
        for item in _shard_samples(shard, self.spec):
            if isinstance(item, ShardEnd):
                yield item
                continue
            if resume is not None and item.index < resume.start:
                continue  # delivered before the pool was restarted
            if shard.skip_keys.get(item.index) == item.key:
                continue  # answered and checkpointed by an earlier run (another key there: answered again)
            if resume is not None and item.index in resume.poisoned:
                item.error = f"a decoder process died twice while preparing this sample ({resume.reason})"
            elif self.slots is not None:
                self.slots.preparing(worker_id, item.index)
            yield preparer.prepare(item, shard)


def _shard_samples(shard: Shard, spec: JobSpec) -> Iterator[RawSample | ShardEnd]:
    """read_shard, where a shard that lacks what the job names (its --key-field or
    --image-field column) is that shard's one error row: only the first shard is checked up
    front, and one such shard among many must not stop the job."""
    data = spec.data
    try:
        yield from read_shard(shard, data.image_field, data.key_field, data.max_file_bytes, data.read_retries)
    except UsageError as exc:
        yield shard_error_sample(f"{exc} in {shard.url}")
        yield ShardEnd(shard, 1, message=str(exc))


def _worker_init(slots: WorkerSlots | None, parent_pid: int, worker_id: int) -> None:
    """Workers ignore SIGINT and SIGTERM: Ctrl-C goes to the whole process group, and
    schedulers (SLURM) send SIGTERM to every process of a job; the main process, not
    each decoder, decides how to stop. They die with their parent, and say who they
    are, so a dead decoder's shard can be resumed."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid, exit_code=0)  # torch notices a dead parent only every few seconds
    if slots is not None:
        slots.register(worker_id)


def prepared_stream(spec: JobSpec, preparer: SamplePreparer, feed: ShardSupply) -> Iterator[PreparedSample | ShardEnd]:
    """The preprocessing stage: in-process when workers == 0, else a DataLoader pool.

    Decoders fork from this process with `preparer` (and its processor) already built.
    """
    workers = default_decoders() if spec.data.workers is None else spec.data.workers
    if workers == 0:
        yield from ShardStream(spec, preparer, feed)
        return
    # decoder processes fork after the tokenizer has run: its thread pool must not be used in them
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    spill = SpillDir()

    def make_loader(resume: list[ResumePoint], slots: WorkerSlots) -> torch.utils.data.DataLoader:
        spill.clear()  # a previous pool's unread items: their shards are resumed
        loader_kwargs: dict[str, Any] = dict(
            batch_size=None,
            num_workers=workers,
            prefetch_factor=spec.data.prefetch,
            collate_fn=spill.wrap,  # runs in the decoder, on each item it yields
            worker_init_fn=functools.partial(_worker_init, slots, os.getpid()),
            multiprocessing_context="fork" if "fork" in mp.get_all_start_methods() else None,
        )
        if "in_order" in torch.utils.data.DataLoader.__init__.__code__.co_varnames:
            loader_kwargs["in_order"] = False  # a slow shard must not hold back the others
        return torch.utils.data.DataLoader(ShardStream(spec, preparer, feed, resume, slots), **loader_kwargs)

    try:
        yield from supervised_stream(make_loader, feed.shards, workers)
    finally:
        spill.remove()
