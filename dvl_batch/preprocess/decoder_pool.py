"""Decoder processes that may die: restart the pool, resume its shards, skip what kills it.

A native crash in an image library or the kernel's OOM killer can end a decoder process
at any moment, and torch's DataLoader then fails the whole iteration. `supervised_stream`
runs the DataLoader so that a dead decoder costs a restart, not the job:

- every decoder records in shared memory its pid, its shard and the sample it is preparing;
- when one dies, a fresh pool resumes every shard that was in flight at its first sample
  the device process has not received (samples before it were already delivered; the
  ones after it may have been lost in the dead process's queue);
- a sample that two decoders died preparing becomes an error row instead of being
  decoded a third time, so a poison image costs two restarts, not the job.

torch reports a dead worker from a SIGCHLD handler, i.e. at whatever line the main thread
happens to run (in the engine, in the middle of writing a part). That handler is switched
off while we iterate, so the failure surfaces from the DataLoader's `next()` instead (torch
checks its workers whenever it waits for data), where it is handled.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import DvlError
from ..processes import process_alive
from ..records import Shard, ShardEnd

WORKER_DEATH = "DataLoader worker (pid"  # how torch words "a worker process died"
MAX_FRUITLESS_RESTARTS = 3  # restarts in a row without a single item delivered
POISON_STRIKES = 2


@dataclass(frozen=True)
class ResumePoint:
    """Where a fresh decoder pool picks up a shard that was in flight when a decoder died."""

    shard: Shard
    start: int  # first sample index the device process has not received
    poisoned: frozenset[int] = frozenset()  # samples that killed a decoder twice: error rows, not decoded
    reason: str = ""


@dataclass(frozen=True)
class DecoderFailure:
    """Stream item: a decoder raised (a bug, a bad setting); the run ends with this one line."""

    message: str
    exit_code: int = 1

    @classmethod
    def of(cls, exc: BaseException) -> DecoderFailure:
        if isinstance(exc, DvlError):
            return cls(str(exc), exc.exit_code)
        text = (str(exc).strip().splitlines() or [""])[0]
        return cls(f"a decoder process failed: {type(exc).__name__}: {text}".rstrip(": "))

    def error(self) -> DvlError:
        error = DvlError(self.message)
        error.exit_code = self.exit_code
        return error


@dataclass(frozen=True)
class DecoderRestart:
    """Stream item: the decoder pool was restarted after a decoder process died."""

    message: str


class WorkerSlots:
    """Shared memory where each decoder records its pid, its shard (feed index) and the sample
    it is preparing, so that after a death the supervisor knows what was in flight; and every
    shard this pool took, since a decoder that moved on to its next shard may have left the
    last one's samples in the loader's queue, lost with the pool."""

    def __init__(self, workers: int, shards: int = 0, context: Any = None):
        self.workers = workers
        context = context or mp.get_context()
        self.values = context.Array("q", [0, -1, -1] * workers, lock=False)
        self.taken = context.Array("b", max(1, shards), lock=False)

    def register(self, worker_id: int) -> None:
        self.values[3 * worker_id] = os.getpid()

    def working_on(self, worker_id: int, feed_index: int) -> None:
        if feed_index < len(self.taken):
            self.taken[feed_index] = 1
        self.values[3 * worker_id + 1] = feed_index
        self.values[3 * worker_id + 2] = -1

    def preparing(self, worker_id: int, sample_index: int) -> None:
        self.values[3 * worker_id + 2] = sample_index

    def entries(self) -> list[tuple[int, int, int]]:
        """(pid, feed index or -1, sample index or -1) per worker."""
        return [tuple(self.values[3 * w : 3 * w + 3]) for w in range(self.workers)]  # type: ignore[misc]


class _Delivered:
    """What the device process has received: per shard the next sample index, and ended shards."""

    def __init__(self) -> None:
        self.next_index: dict[str, int] = {}
        self.ended: set[str] = set()
        self.items = 0

    def saw(self, item: Any) -> None:
        self.items += 1
        if isinstance(item, ShardEnd):
            self.ended.add(item.shard.id)
        elif hasattr(item, "shard_id"):
            self.next_index[item.shard_id] = item.index + 1

    def expect(self, points: list[ResumePoint]) -> None:
        for point in points:
            self.next_index[point.shard.id] = point.start


def _in_flight(
    slots: WorkerSlots, shards: list[Shard], previous: list[ResumePoint], delivered: _Delivered,
    strikes: Counter, reason: str,
) -> list[ResumePoint]:
    """The shards to resume after a pool failed; each sample a dead decoder was preparing gets a strike."""
    open_shards: dict[str, Shard] = {p.shard.id: p.shard for p in previous}
    for index, taken in enumerate(slots.taken[: len(shards)]):
        if taken:  # handed to this pool: finished (its ShardEnd delivered) or resumed, never dropped
            open_shards[shards[index].id] = shards[index]
    for pid, index, sample in slots.entries():
        if index < 0:
            continue
        shard = shards[index]
        open_shards[shard.id] = shard
        if sample >= 0 and not process_alive(pid):
            strikes[(shard.id, sample)] += 1
    points = []
    for shard_id, shard in open_shards.items():
        if shard_id in delivered.ended:
            continue
        start = delivered.next_index.get(shard_id, 0)
        poisoned = frozenset(i for (sid, i), n in strikes.items() if sid == shard_id and i >= start and n >= POISON_STRIKES)
        points.append(ResumePoint(shard, start, poisoned, reason))
    return points


def _disarm_async_worker_errors() -> None:
    """Remove torch's SIGCHLD handler (if installed) so that worker deaths surface from next()."""
    if threading.current_thread() is not threading.main_thread():
        return  # torch installs its handler only from the main thread
    if getattr(signal.getsignal(signal.SIGCHLD), "__module__", "").startswith("torch."):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _kill_decoders(iterator: Any) -> None:
    """SIGKILL the decoders of a pool that is abandoned (a stop, an error, a dead decoder).

    They ignore SIGTERM (stream.py), and torch's shutdown only asks and waits (5 s a worker,
    twice): one busy on a slow read or a huge image would outlive it, and the interpreter's
    exit would then wait on it forever. Their work in flight is redone on resume anyway."""
    for worker in getattr(iterator, "_workers", ()):  # torch's multiprocessing loader iterator
        if worker.is_alive():
            worker.kill()
    for worker in getattr(iterator, "_workers", ()):
        worker.join(timeout=5)


def supervised_stream(
    make_loader: Callable[[list[ResumePoint], WorkerSlots], Any], shards: list[Shard], workers: int,
) -> Iterator[Any]:
    """Items of `make_loader(resume, slots)`, restarting it (and resuming shards) when a decoder dies."""
    original_handler = signal.getsignal(signal.SIGCHLD) if threading.current_thread() is threading.main_thread() else None
    delivered = _Delivered()
    strikes: Counter = Counter()
    resume: list[ResumePoint] = []
    fruitless = 0
    try:
        while True:
            slots = WorkerSlots(workers, len(shards))
            delivered.expect(resume)
            items_before = delivered.items
            iterator = iter(make_loader(resume, slots))
            _disarm_async_worker_errors()
            exhausted = False
            try:
                for item in iterator:
                    delivered.saw(item)
                    yield item
                exhausted = True
                return
            except RuntimeError as exc:
                if not str(exc).startswith(WORKER_DEATH):
                    raise
                reason = str(exc)
                resume = _in_flight(slots, shards, resume, delivered, strikes, reason)
            finally:
                if not exhausted:
                    _kill_decoders(iterator)
                del iterator  # shuts the remaining decoders down
            fruitless = fruitless + 1 if delivered.items == items_before else 0
            if fruitless > MAX_FRUITLESS_RESTARTS:
                raise DvlError(f"decoder processes keep dying before preparing anything ({reason})")
            yield DecoderRestart(f"a decoder process died ({reason}); restarted, {len(resume)} shards resumed")
    finally:
        if original_handler is not None:
            signal.signal(signal.SIGCHLD, original_handler)
