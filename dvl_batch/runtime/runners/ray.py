"""The Ray runner: one engine actor per GPU of a Ray cluster, shards handed out in chunks.

`--runner ray` connects to a cluster (`--ray-address`, RAY_ADDRESS) or starts a local
one, creates one `EngineActor` (a DeviceWorker) per GPU (`--gpus N` for N, or
`--gpus cpu,cpu` for CPU actors), and hands each actor small chunks of shards as it
frees up, so fast actors take more. Actors write their parts straight into OUT,
which must therefore be a filesystem every node mounts at the same path; the write
is the same atomic one as everywhere else, so resume semantics do not change.

Lost workers are Ray's job: an actor whose process dies is restarted (model loaded
again) and the chunk it was on is retried; shards whose part already exists are
skipped, so nothing is written twice. An actor that stays dead has its chunks
handed to the others. The driver (this process) holds the OUT lock, folds the
actors' progress into the one reporter, and on SIGINT/SIGTERM asks every actor to
finish its in-flight shards and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ...errors import EXIT_FAILED, DvlError, UsageError

try:
    import ray
except ImportError as exc:  # pragma: no cover - depends on the extra being installed
    raise UsageError("--runner ray needs Ray: pip install 'dvl-batch[ray]'") from exc

from ...config.launch import decoders_per_engine, parse_gpus, usable_cpus
from ...records import Shard
from ..feed import ShardFeed
from ..job import PreparedJob
from ..stats import RunStats, StopFlag
from .engines import EngineTask, StatsTally, snapshot, stats_from

MAX_SHARDS_PER_CALL = 8  # a call restarts the decoder pool and drains the engine once
CALLS_PER_ACTOR = 2  # one running, one queued: no idle gap between chunks
ACTOR_RESTARTS = 3  # per actor, for processes that die (OOM killer, lost node, CUDA fault)
CHUNK_ATTEMPTS = 3  # actors a chunk may outlive before it is given up for this run
PROGRESS_SECONDS = 2.0


@ray.remote(concurrency_groups={"control": 1}, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
class EngineActor:
    """One engine on one GPU (or CPU) of the cluster; `process` runs one chunk of shards."""

    def __init__(self, task: EngineTask):
        self.task = task
        self.stop = StopFlag()
        self.current: tuple[int, dict[str, Any]] | None = None
        self.error: dict[str, Any] | None = None
        try:
            from ...sink.output import OutputDir
            from ..worker import DeviceWorker  # which hushes library logs unless run.verbose
            spec = task.spec
            if spec.data.workers is None:
                spec = replace(spec, data=replace(spec.data, workers=self._decoders(task.device)))
            self.worker = DeviceWorker(spec, task.model, device=task.device)
            self.out = OutputDir(task.out_root, task.rank, task.world_size)  # no lock: the driver holds it
        except DvlError as exc:  # reported by ready(): the same mistake would fail every actor
            self.error = {"message": str(exc), "exit_code": exc.exit_code}

    @staticmethod
    def _decoders(device: str) -> int:
        """GPU actors split their node's cores; CPU actors decode with one process."""
        if device == "cpu":
            return 1
        node_id = ray.get_runtime_context().get_node_id()
        resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
        cpus = int(resources.get("CPU", usable_cpus()))
        return decoders_per_engine(cpus, max(1, int(resources.get("GPU", 1))))

    def ready(self) -> dict[str, Any]:
        return {"where": f"{socket.gethostname()}:{os.getpid()}", "error": self.error}

    def process(self, chunk_id: int, shards: list[Shard]) -> dict[str, Any]:
        """Run a chunk; shards with a part already (a retried call) count as written, not redone."""
        todo = [s for s in shards if not self.out.part_path(s.id).exists()]
        stats = RunStats(shards_written=len(shards) - len(todo))
        if todo and not self.stop.requested:

            def report(current: RunStats) -> None:
                self.current = (chunk_id, snapshot(current))

            stats.add(self.worker.process(ShardFeed(todo), self.out, self.task.metadata, on_progress=report, stop=self.stop))
        self.current = None
        return snapshot(stats)

    @ray.method(concurrency_group="control")
    def progress(self) -> tuple[int, dict[str, Any]] | None:
        return self.current

    @ray.method(concurrency_group="control")
    def request_stop(self) -> None:
        self.stop.requested = True


def ray_engine_devices(gpus: str | None, cluster_gpus: int) -> list[str]:
    """--gpus read as everywhere (config.launch.parse_gpus): one engine per entry, or 'all' (the
    default here) for one actor per GPU of the cluster. Ray picks each actor's GPU, so a GPU
    entry asks for one GPU actor; 'cpu' entries are CPU actors."""
    request = parse_gpus(gpus or "all")
    if request.every:
        if cluster_gpus == 0:
            raise UsageError("the Ray cluster has no GPUs; --gpus cpu,cpu,... runs CPU engine actors")
        return ["cuda:0"] * cluster_gpus  # Ray gives each actor one GPU, visible as cuda:0
    return ["cpu" if entry == "cpu" else "cuda:0" for entry in request.entries]


def _connect(address: str | None, cpu_actors: int) -> bool:
    """Join the given cluster, reuse a session the caller opened, or start a local one.
    Returns whether we started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    common: dict[str, Any] = dict(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
    ours = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    if address:
        ray.init(address=address, **common)
    else:
        cpus = max(usable_cpus(), cpu_actors + 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **common)
    if threading.current_thread() is threading.main_thread():
        for signum, handler in ours.items():  # ray.init installs its own: SIGTERM would end the driver at once
            signal.signal(signum, handler)
    return True


@dataclass
class Chunk:
    id: int
    shards: list[Shard]
    attempts: int = 0


def make_chunks(shards: list[Shard], actors: int) -> list[Chunk]:
    """About four chunks per actor for balance, at most MAX_SHARDS_PER_CALL shards each."""
    size = max(1, min(MAX_SHARDS_PER_CALL, len(shards) // (4 * max(actors, 1))))
    return [Chunk(i, shards[start : start + size]) for i, start in enumerate(range(0, len(shards), size))]


def _error_from(exc: BaseException) -> BaseException:
    """The exception raised inside an actor, without Ray's wrapping."""
    return getattr(exc, "cause", None) or exc


def _raise_dvl(message: str, exit_code: int) -> None:
    error = DvlError(message)
    error.exit_code = exit_code
    raise error


class RayScheduler:
    """Hands chunks to actors as they free up and keeps score of what came back."""

    def __init__(self, job: PreparedJob, devices: list[str]):
        self.job = job
        self.devices = devices
        self.chunks = deque(make_chunks(job.todo, len(devices)))
        self.actors: list[Any] = []
        self.pending_ready: dict[Any, int] = {}
        self.usable: set[int] = set()
        self.dead: set[int] = set()
        self.in_flight: dict[Any, tuple[int, Chunk]] = {}
        self.tally = StatsTally()
        self.failures: list[str] = []
        self.stopping = False

    def start(self) -> None:
        run = self.job.spec.run
        for index, device in enumerate(self.devices):
            task = EngineTask(
                index, device, self.job.spec, self.job.model, str(self.job.out.root.resolve()), run.rank,
                run.world_size, self.job.metadata,
            )
            actor = EngineActor.options(num_cpus=1, num_gpus=0 if device == "cpu" else 1).remote(task)
            self.actors.append(actor)
            self.pending_ready[actor.ready.remote()] = index

    def _busy(self, index: int) -> int:
        return sum(1 for actor_index, _ in self.in_flight.values() if actor_index == index)

    def _submit(self) -> None:
        while self.chunks and not self.stopping:
            free = [i for i in self.usable - self.dead if self._busy(i) < CALLS_PER_ACTOR]
            if not free:
                return
            index = min(free, key=self._busy)
            chunk = self.chunks.popleft()
            self.in_flight[self.actors[index].process.remote(chunk.id, chunk.shards)] = (index, chunk)

    def _on_ready(self, ref: Any) -> None:
        index = self.pending_ready.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.dead.add(index)
            self.failures.append(f"engine actor {index} could not start: {str(exc).strip().splitlines()[-1]}")
            return
        if info["error"]:
            _raise_dvl(f"engine actor on {info['where']}: {info['error']['message']}", info["error"]["exit_code"])
        self.usable.add(index)

    def _on_result(self, ref: Any) -> None:
        index, chunk = self.in_flight.pop(ref)
        try:
            stats = stats_from(ray.get(ref))
        except ray.exceptions.RayActorError:
            self._lost(index, chunk)
            return
        except ray.exceptions.RayTaskError as exc:
            error = _error_from(exc)
            if isinstance(error, DvlError):
                raise error from None
            self.tally.forget(chunk.id)
            self.failures.append(f"shards {', '.join(s.id for s in chunk.shards)}: {type(error).__name__}: {error}")
            return
        self._record(index, chunk.id, stats, finished=True)

    def _lost(self, index: int, chunk: Chunk) -> None:
        """An actor that stayed dead: its chunk goes to another actor (parts it wrote are kept)."""
        self.dead.add(index)
        self.tally.forget(chunk.id)
        chunk.attempts += 1
        if chunk.attempts < CHUNK_ATTEMPTS:
            self.chunks.appendleft(chunk)
        else:
            self.failures.append(f"shards {', '.join(s.id for s in chunk.shards)} outlived {chunk.attempts} engine actors")

    def _record(self, index: int, chunk_id: int, stats: RunStats, finished: bool) -> None:
        engine, stats.engine = stats.engine, {}
        if engine:
            self.tally.engine[index] = engine  # cumulative per actor: the latest counts
        if finished:
            self.tally.finish(chunk_id, stats)
        else:
            self.tally.update(chunk_id, stats)

    def _poll_progress(self) -> None:
        running = {chunk.id for _, chunk in self.in_flight.values()}
        busy = {index for index, _ in self.in_flight.values()} - self.dead
        refs = {self.actors[i].progress.remote(): i for i in busy}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROGRESS_SECONDS)
        for ref in done:
            try:
                current = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            if current is not None and current[0] in running:
                self._record(refs[ref], current[0], stats_from(current[1]), finished=False)

    def _request_stop(self) -> None:
        self.stopping = True
        self.chunks.clear()
        for index in self.usable - self.dead:
            self.actors[index].request_stop.remote()

    def run(self, stop: StopFlag, on_progress: Callable[[RunStats], None]) -> RunStats:
        last_poll = time.monotonic()
        while True:
            if stop.requested and not self.stopping:
                self._request_stop()
            self._submit()
            if not self.in_flight and (self.stopping or not self.chunks):
                return self.tally.total()
            if not self.in_flight and not self.pending_ready:
                _raise_dvl("no engine actor is left to run the remaining shards: " + "; ".join(self.failures[-3:]), EXIT_FAILED)
            done, _ = ray.wait([*self.in_flight, *self.pending_ready], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self.pending_ready:
                    self._on_ready(ref)
                else:
                    self._on_result(ref)
            if time.monotonic() - last_poll >= PROGRESS_SECONDS and self.in_flight:
                self._poll_progress()
                last_poll = time.monotonic()
            on_progress(self.tally.total())

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def run_ray(job: PreparedJob, on_progress: Callable[[RunStats], None], stop: StopFlag) -> RunStats:
    """Process this rank's open shards with engine actors on a Ray cluster."""
    if job.spec.model.device_map:
        raise UsageError("--device-map cannot be combined with --runner ray (one actor holds one GPU)")
    if not job.todo:
        return RunStats()
    gpus = job.spec.run.gpus
    cpu_actors = parse_gpus(gpus).entries.count("cpu") if gpus else 0
    started = time.perf_counter()
    we_started = _connect(job.spec.run.ray_address, cpu_actors)
    scheduler = None
    try:
        devices = ray_engine_devices(gpus, int(ray.cluster_resources().get("GPU", 0)))
        scheduler = RayScheduler(job, devices[: len(job.todo)])
        scheduler.start()
        stats = scheduler.run(stop, on_progress)
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        if we_started:
            ray.shutdown()
    job.out.remove_stale_temp(job.owns)  # half-written parts of actors that were killed
    if scheduler.failures:
        message = scheduler.failures[0] + (f" (and {len(scheduler.failures) - 1} more)" if len(scheduler.failures) > 1 else "")
        _raise_dvl(f"{message}; finished shards are saved, rerun the same command to do the rest", EXIT_FAILED)
    stats.seconds = time.perf_counter() - started
    return stats

