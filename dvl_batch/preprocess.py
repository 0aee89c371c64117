"""Preprocess: raw samples to model-ready requests, in worker processes with prefetch.

Workers pull whole shards from a shared `ShardFeed` (so a fast consumer simply takes
more shards), read them, decode and resize every image, render and tokenize every
question, and hand `PreparedSample`s to the device process through a torch
DataLoader (large items spilled to tmpfs, see handoff.py). A sample that fails
anywhere here is still sent, with `error` set: the sink must write a row for it.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .decoder_pool import ResumePoint, WorkerSlots, supervised_stream
from .handoff import SpillDir
from .images import ImageError, ImageView, decode_image_drafted, render_views, views_from_image_processor
from .prompts import PromptRenderer, QuestionBook
from .sources import RawSample, Shard, ShardEnd, read_shard
from .spec import JobSpec


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
    # through a file descriptor handshake (~2 ms each), an array in a spill file (handoff.py)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    requests: list[PromptRequest] = field(default_factory=list)
    error: str | None = None
    decode_seconds: float = 0.0


class ShardFeed:
    """Hands out shards one at a time to any number of processes (a shared counter)."""

    def __init__(self, shards: list[Shard], context: Any = None):
        context = context or mp.get_context()
        self.shards = list(shards)
        self.by_id = {shard.id: shard for shard in self.shards}
        self._next = context.Value("q", 0)
        self._closed = context.Value("b", 0)

    def take(self, claim: Callable[[int], None] | None = None) -> Shard | None:
        """The next shard; `claim(index)` records the taker under the lock (see decoder_pool)."""
        with self._next.get_lock():
            index = self._next.value
            if self._closed.value or index >= len(self.shards):
                return None
            self._next.value = index + 1
            if claim is not None:
                claim(index)
        return self.shards[index]

    def close(self) -> None:
        """Hand out nothing more (limit reached, or the run is stopping)."""
        with self._next.get_lock():
            self._closed.value = 1

    @property
    def handed_out(self) -> int:
        return min(self._next.value, len(self.shards))


class SamplePreparer:
    """Everything a worker needs to turn a RawSample into a PreparedSample."""

    def __init__(self, spec: JobSpec, model_path: str):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_path)
        self.spec = spec
        self.processor = processor
        self.views: list[ImageView] = views_from_image_processor(processor.image_processor)
        self.renderer = PromptRenderer.from_spec(processor, spec.prompt)
        self.questions = QuestionBook(spec.prompt)
        roots = [v.size for v in self.views if v.source is None]
        self.draft_side = max(roots) if spec.data.fast_decode else None

    def prepare(self, raw: RawSample, shard: Shard) -> PreparedSample:
        started = time.perf_counter()
        sample = PreparedSample(shard_id=shard.id, key=raw.key, index=raw.index, error=raw.error)
        questions = self.questions.questions_for(raw.key, raw.fields)
        if not questions:
            sample.error = sample.error or "no question for this sample"
            questions = [""]
        sample.requests = [PromptRequest(question=q) for q in questions]
        if sample.error is None:
            try:
                sample.pixels = self._pixels(raw.images)
            except ImageError as exc:
                sample.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd image must not end a million-image job
                sample.error = f"image preprocessing failed ({type(exc).__name__}: {exc})"
        if sample.error is None:
            n_images = len(raw.images)
            for request in sample.requests:
                self._tokenize(request, n_images)
        sample.decode_seconds = time.perf_counter() - started
        return sample

    def _tokenize(self, request: PromptRequest, n_images: int) -> None:
        try:
            prompt = self.renderer.tokenize(request.question, n_images)
        except ValueError as exc:
            request.error = str(exc)
            return
        request.input_ids, request.prefix_len = prompt.input_ids, prompt.prefix_len

    def _pixels(self, images: list[bytes]) -> dict[str, np.ndarray]:
        per_view: dict[str, list[np.ndarray]] = {v.name: [] for v in self.views}
        for data in images:
            image, drafted = decode_image_drafted(data, self.spec.data.max_image_pixels, self.draft_side)
            if self.spec.data.fast_decode:
                rendered = render_views(image, self.views, approximate=drafted)
            else:
                rendered = {k: np.asarray(v[0]) for k, v in self.processor.image_processor(image).items()}
            for name, array in rendered.items():
                per_view[name].append(array)
        return {name: np.stack(arrays) for name, arrays in per_view.items()}


class ShardStream(torch.utils.data.IterableDataset):
    """Iterable over PreparedSample and ShardEnd items, shards pulled from a feed.

    After a decoder died, a fresh pool first finishes the shards that were in flight
    (`resume`, shared out by worker id), then pulls new ones; `slots` tells the
    supervisor which decoder holds which shard.
    """

    def __init__(self, spec: JobSpec, model_path: str, feed: ShardFeed,
                 resume: list[ResumePoint] | None = None, slots: WorkerSlots | None = None):
        super().__init__()
        self.spec, self.model_path, self.feed = spec, model_path, feed
        self.resume, self.slots = list(resume or ()), slots

    def __iter__(self) -> Iterator[PreparedSample | ShardEnd]:
        preparer = SamplePreparer(self.spec, self.model_path)
        info = torch.utils.data.get_worker_info()
        worker_id, n_workers = (info.id, info.num_workers) if info else (0, 1)
        claim = (lambda index: self.slots.working_on(worker_id, index)) if self.slots else None
        for point in self.resume[worker_id::n_workers]:
            if claim:
                claim(self.feed.shards.index(point.shard))
            yield from self._shard_items(preparer, point.shard, worker_id, point)
        while (shard := self.feed.take(claim)) is not None:
            yield from self._shard_items(preparer, shard, worker_id, None)

    def _shard_items(self, preparer: SamplePreparer, shard: Shard, worker_id: int, resume: ResumePoint | None):
        for item in read_shard(shard, self.spec.data.image_field, self.spec.data.key_field):
            if isinstance(item, ShardEnd):
                yield item
                continue
            if resume is not None and item.index < resume.start:
                continue  # delivered before the pool was restarted
            if resume is not None and item.index in resume.poisoned:
                item.error = f"a decoder process died twice while preparing this sample ({resume.reason})"
            elif self.slots is not None:
                self.slots.preparing(worker_id, item.index)
            yield preparer.prepare(item, shard)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this decoder when the process that forked it dies.

    torch's own check notices a dead parent only every few seconds, and an orphan keeps
    the parent's inherited sockets open: a killed Ray actor is not seen as dead (and not
    restarted) while its decoders live on.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: torch's watchdog still ends orphans
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died before the prctl took effect


def _worker_init(slots: WorkerSlots | None, parent_pid: int, worker_id: int) -> None:
    """Workers ignore SIGINT and SIGTERM: Ctrl-C goes to the whole process group, and
    schedulers (SLURM) send SIGTERM to every process of a job; the main process, not
    each decoder, decides how to stop. They die with their parent, and say who they
    are, so a dead decoder's shard can be resumed."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    if slots is not None:
        slots.register(worker_id)


def default_workers(cpu_count: int | None = None) -> int:
    """Leave one core to the device process; at most 16 decoders."""
    cpus = cpu_count or os.cpu_count() or 1
    return max(1, min(16, cpus - 1))


def prepared_stream(spec: JobSpec, model_path: str, feed: ShardFeed) -> Iterator[PreparedSample | ShardEnd]:
    """The preprocessing stage: in-process when workers == 0, else a DataLoader pool."""
    workers = default_workers() if spec.data.workers is None else spec.data.workers
    if workers == 0:
        yield from ShardStream(spec, model_path, feed)
        return

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
        return torch.utils.data.DataLoader(ShardStream(spec, model_path, feed, resume, slots), **loader_kwargs)

    try:
        yield from supervised_stream(make_loader, feed.shards, workers)
    finally:
        spill.remove()
