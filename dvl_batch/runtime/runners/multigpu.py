"""The multi-GPU runner: one engine process per device, shards handed out as engines free up.

`--gpus all` (or `0,1,...`, or `cpu,cpu` for CPU engines) spawns one process per
device. All of them, and all their decoder workers, pull shards from one shared
`ShardFeed`, so a faster GPU simply takes more shards. Each engine writes its parts
straight into OUT with the same atomic write as the local runner; a shard is handed
out once, so each part is written once. This process keeps the OUT lock (engines
never take it), folds the engines' progress into the one reporter and summary, and
relays SIGINT/SIGTERM: engines stop taking samples, finish their in-flight shards
and exit. An engine that dies loses only its unfinished shards (no part, so the next
run redoes them); the others carry on and the run then fails with exit code 1.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from ...config.launch import parse_device_list, usable_cpus
from ...errors import EXIT_FAILED, EXIT_USAGE, DvlError, UsageError
from ...processes import die_with_parent
from ..feed import ShardFeed
from ..job import PreparedJob
from ..stats import RunStats, StopFlag
from .engines import EngineTask, StatsTally, snapshot, spec_for_engines, stats_from

POLL_SECONDS = 0.25
EXIT_GRACE_SECONDS = 30.0


class SharedStopFlag(StopFlag):
    """A StopFlag every engine process and the parent share: set anywhere, seen everywhere."""

    def __init__(self, event: Any):
        self._event = event
        super().__init__()

    @property
    def requested(self) -> bool:  # type: ignore[override]
        return self._event.is_set()

    @requested.setter
    def requested(self, value: bool) -> None:
        if value:
            self._event.set()


def _engine_signals(stop_event: Any) -> None:
    """Ctrl-C reaches the whole process group: the parent decides for it. A SIGTERM sent
    to an engine itself (e.g. by a scheduler) stops every engine the graceful way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_event.set())


def engine_main(task: EngineTask, feed: ShardFeed, events: Any, stop_event: Any, parent_pid: int) -> None:
    """Entry point of one spawned engine process: build the worker, run the feed, report."""
    die_with_parent(parent_pid, exit_code=1)  # a new run must not find an orphan still writing parts
    _engine_signals(stop_event)
    try:
        import torch

        from ...sink.output import OutputDir
        from ..worker import DeviceWorker  # which hushes library logs unless run.verbose
        if task.torch_threads:
            torch.set_num_threads(task.torch_threads)
        worker = DeviceWorker(task.spec, task.model, device=task.device)
        out = OutputDir(task.out_root, task.rank, task.world_size)  # no lock: the parent holds it

        def report(stats: RunStats) -> None:
            events.put(("progress", task.index, snapshot(stats)))

        stats = worker.process(feed, out, task.metadata, on_progress=report, stop=SharedStopFlag(stop_event))
        events.put(("done", task.index, snapshot(stats)))
    except DvlError as exc:
        events.put(("failed", task.index, {"message": str(exc), "exit_code": exc.exit_code}))
    except BaseException as exc:  # noqa: BLE001 - a bug: show it, and tell the parent in one line
        traceback.print_exc()
        events.put(("failed", task.index, {"message": f"{type(exc).__name__}: {exc}", "exit_code": EXIT_FAILED}))


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class EnginePool:
    """The spawned engine processes of one run and what they reported."""

    def __init__(self, job: PreparedJob, devices: list[str]):
        self.job = job
        self.devices = devices
        self.context = mp.get_context("spawn")  # CUDA cannot be used in forked children
        self.feed = ShardFeed(job.todo, context=self.context)
        self.events = self.context.Queue()
        self.stop_event = self.context.Event()
        self.processes: list[Any] = []
        self.ended: set[int] = set()
        self.failures: list[tuple[str, int]] = []  # (message, exit code)
        self.tally = StatsTally()

    def start(self) -> None:
        spec = spec_for_engines(self.job.spec, len(self.devices))
        threads = max(1, usable_cpus() // len(self.devices))  # for CPU engines
        for index, device in enumerate(self.devices):
            task = EngineTask(
                index, device, spec, self.job.model, str(self.job.out.root), self.job.spec.run.rank,
                self.job.spec.run.world_size, self.job.metadata, threads if device == "cpu" else None,
            )
            process = self.context.Process(
                target=engine_main, args=(task, self.feed, self.events, self.stop_event, os.getpid()),
                name=f"dvl-batch-engine-{index}",
            )
            process.start()
            self.processes.append(process)

    def _handle(self, kind: str, index: int, payload: dict[str, Any]) -> None:
        if kind == "progress":
            self.tally.update(index, stats_from(payload))
        elif kind == "done":
            self.tally.finish(index, stats_from(payload))
            self.ended.add(index)
        elif kind == "failed":
            self.ended.add(index)
            self._lost(index)
            self.failures.append((f"engine process {index} ({self.devices[index]}): {payload['message']}", payload["exit_code"]))

    def _lost(self, index: int) -> None:
        """Keep what a lost engine wrote; its unfinished shards have no part and are redone next run."""
        self.tally.finish(index, self.tally.running.get(index, RunStats()))

    def _drain(self) -> None:
        while True:
            try:
                self._handle(*self.events.get_nowait())
            except queue.Empty:
                return

    def _check_exits(self) -> None:
        for index, process in enumerate(self.processes):
            if index in self.ended or process.exitcode is None:
                continue
            self._drain()  # its last message may still be in the pipe
            if index not in self.ended:
                self.ended.add(index)
                self._lost(index)
                self.failures.append((
                    f"engine process {index} ({self.devices[index]}) {_exit_description(process.exitcode)}; "
                    "its unfinished shards were not written",
                    EXIT_FAILED,
                ))

    def wait(self, stop: StopFlag, on_progress: Callable[[RunStats], None]) -> RunStats:
        """Until every engine has ended: relay stop requests, fold reports into progress."""
        while len(self.ended) < len(self.processes):
            if stop.requested:
                self.stop_event.set()
            elif self.stop_event.is_set():  # an engine was sent SIGTERM directly
                stop.requested, stop.reason = True, "SIGTERM to an engine process"
            try:
                self._handle(*self.events.get(timeout=POLL_SECONDS))
            except queue.Empty:
                self._check_exits()
                continue
            on_progress(self.tally.total())
        return self.tally.total()

    def shutdown(self, graceful: bool) -> None:
        """Join the engines; kill any still running when the run is being aborted."""
        deadline = time.monotonic() + (EXIT_GRACE_SECONDS if graceful else 0)
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self.events.close()
        self.events.cancel_join_thread()


def run_multi_gpu(job: PreparedJob, on_progress: Callable[[RunStats], None], stop: StopFlag) -> RunStats:
    """Process this rank's open shards with one engine process per listed device."""
    if job.spec.model.device_map:
        raise UsageError("--device-map spreads one model over several GPUs; it cannot be combined with --gpus")
    devices = parse_device_list(job.spec.run.gpus or "all")
    if not job.todo:
        return RunStats()
    started = time.perf_counter()
    pool = EnginePool(job, devices[: len(job.todo)])  # more engines than shards would idle
    graceful = False
    try:
        pool.start()
        stats = pool.wait(stop, on_progress)
        graceful = True
    finally:
        pool.shutdown(graceful)
    if pool.failures:
        job.out.remove_stale_temp(job.owns)
        message, code = pool.failures[0]
        if len(pool.failures) > 1:
            message += f" (and {len(pool.failures) - 1} more engine failures)"
        if code != EXIT_USAGE:
            message += "; finished shards are saved, rerun the same command to do the rest"
        error = DvlError(message)
        error.exit_code = code
        raise error
    stats.seconds = time.perf_counter() - started
    return stats
