"""The Python API: `run(JobSpec)` does what `dvl-batch caption/vqa/run` do.

The CLI is a thin layer over this function, so scripts and notebooks get the same
resume, locking and error semantics as the command line.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .job import PreparedJob, prepare_job
from .pipeline import RunStats, StopFlag
from .progress import NullReporter, make_reporter
from .spec import JobSpec


def default_cache_dir() -> Path:
    """Where the offline tiny models are built: $DVL_BATCH_CACHE, else the XDG cache."""
    if os.environ.get("DVL_BATCH_CACHE"):
        return Path(os.environ["DVL_BATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dvl-batch"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


@dataclass
class JobResult:
    """What a run did: its stats plus enough context for the summary and exit code."""

    stats: RunStats
    out: Path
    model: str
    shards_total: int
    shards_done_before: int
    seconds: float
    interrupted: bool = False
    notice: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shards_done(self) -> int:
        return self.shards_done_before + self.stats.shards_written


class _ProgressFile:
    """Keeps OUT/progress*.json current (at most every few seconds) for `dvl-batch status`."""

    def __init__(self, job: PreparedJob, interval: float = 5.0):
        self.job, self.interval = job, interval
        self.started = time.time()
        self.last = 0.0

    def record(self, stats: RunStats, state: str) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        return {
            "state": state,
            "model": self.job.model.label,
            "shards_total": len(self.job.shards),
            "shards_done": self.job.done_before + stats.shards_written,
            "samples_this_run": stats.samples,
            "rows_this_run": stats.rows,
            "error_rows_this_run": stats.error_rows,
            "images_per_second": round(stats.samples / elapsed, 3),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "rank": self.job.spec.run.rank,
            "world_size": self.job.spec.run.world_size,
            "runner": self.job.spec.run.runner,
            "gpus": self.job.spec.run.gpus,
        }

    def update(self, stats: RunStats, force: bool = False, state: str = "running") -> None:
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            self.job.out.write_progress(self.record(stats, state))


class _Signals:
    """First SIGINT/SIGTERM: finish in-flight work and save it. Second: stop at once."""

    def __init__(self, stop: StopFlag, say: Callable[[str], None]):
        self.stop, self.say = stop, say
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.stop.requested:
            raise KeyboardInterrupt
        self.stop.requested = True
        self.stop.reason = signal.Signals(signum).name
        self.say(f"{self.stop.reason} received: finishing in-flight shards, then exiting (again to abort now)")

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _pick_runner(job: PreparedJob):
    """Ray when asked, one process per GPU for several GPUs, else this process."""
    run_spec = job.spec.run
    if run_spec.runner == "ray":
        from .runners.ray import run_ray

        return run_ray
    gpus = (run_spec.gpus or "").strip().lower()
    if gpus == "all" or "," in gpus:
        from .runners.multigpu import run_multi_gpu

        return run_multi_gpu
    from .runners.local import run_local

    return run_local


def run(
    spec: JobSpec,
    *,
    reporter: NullReporter | None = None,
    cache_dir: Path | None = None,
    offline: bool | None = None,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> JobResult:
    """Run a job to completion (or until interrupted); resumable by running it again."""
    started = time.perf_counter()
    cache = Path(spec.model.cache_dir) if spec.model.cache_dir else (cache_dir or default_cache_dir())
    job = prepare_job(spec, cache, hub_offline() if offline is None else offline)
    reporter = reporter or make_reporter(spec.run.progress)
    progress_file = _ProgressFile(job)
    stop = StopFlag()
    stats = RunStats()
    state = "failed"
    try:
        if job.model.notice:
            say(job.model.notice)
        runner = _pick_runner(job)
        reporter.start(len(job.shards), job.done_before, f"{spec.prompt.task} with {job.model.label}")

        def on_progress(current: RunStats) -> None:
            reporter.update(current)
            progress_file.update(current)

        with _Signals(stop, say):
            stats = runner(job, on_progress, stop)
        state = "interrupted" if stop.requested else "finished"
    except KeyboardInterrupt:
        state = "aborted"
        raise
    finally:
        reporter.close()
        try:
            progress_file.update(stats, force=True, state=state)
        finally:
            job.release()
    return JobResult(
        stats=stats,
        out=job.out.root,
        model=job.model.label,
        shards_total=len(job.shards),
        shards_done_before=job.done_before,
        seconds=time.perf_counter() - started,
        interrupted=stop.requested,
        notice=job.model.notice,
    )
