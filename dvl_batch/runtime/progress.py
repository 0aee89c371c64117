"""Progress reporting: a live bar on a terminal, periodic log lines under cron, OUT/progress*.json.

Throughput shown is images (samples) per second of this run; the ETA extrapolates
from shards finished in this run, since shard sizes are unknown until read.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

from .job import PreparedJob
from .pipeline import RunStats


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.total = 0
        self.done_before = 0

    def rates(self, stats: RunStats) -> tuple[float, float, str]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        remaining = self.total - self.done_before - stats.shards_written
        per_shard = elapsed / stats.shards_written if stats.shards_written else float("inf")
        return elapsed, stats.samples / elapsed, _eta(remaining * per_shard) if remaining > 0 else "0s"


class NullReporter(_Clock):
    def start(self, total_shards: int, done_before: int, label: str) -> None:
        self.total, self.done_before = total_shards, done_before

    def update(self, stats: RunStats) -> None:
        pass

    def close(self) -> None:
        pass


class LogReporter(NullReporter):
    """One line every `interval` seconds on stderr: readable in cron mail and job logs."""

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval = interval
        self.last = 0.0

    def start(self, total_shards: int, done_before: int, label: str) -> None:
        super().start(total_shards, done_before, label)
        print(f"[dvl-batch] {label}: {total_shards - done_before} of {total_shards} shards to do", file=sys.stderr)

    def update(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        _, rate, eta = self.rates(stats)
        done = self.done_before + stats.shards_written
        print(
            f"[dvl-batch] shards {done}/{self.total}, {stats.samples} images, {stats.error_rows} error rows, "
            f"{rate:.1f} img/s, ETA {eta}",
            file=sys.stderr,
            flush=True,
        )


class RichReporter(NullReporter):
    """A rich progress bar over shards with images/s and ETA."""

    def __init__(self) -> None:
        super().__init__()
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} shards"),
            TextColumn("{task.fields[images]} images"),
            TextColumn("[cyan]{task.fields[rate]} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            transient=False,
            redirect_stderr=False,
        )
        self.task = None

    def start(self, total_shards: int, done_before: int, label: str) -> None:
        super().start(total_shards, done_before, label)
        self.progress.start()
        self.task = self.progress.add_task(label, total=total_shards, completed=done_before, images=0, rate="-", eta="?")

    def update(self, stats: RunStats) -> None:
        _, rate, eta = self.rates(stats)
        self.progress.update(
            self.task, completed=self.done_before + stats.shards_written, images=stats.samples,
            rate=f"{rate:.1f}", eta=eta,
        )

    def close(self) -> None:
        self.progress.stop()


def make_reporter(enabled: bool) -> NullReporter:
    if not enabled:
        return NullReporter()
    return RichReporter() if sys.stderr.isatty() else LogReporter()


class ProgressFile:
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
