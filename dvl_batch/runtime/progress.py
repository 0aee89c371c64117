"""Progress reporting: a live bar on a terminal, periodic log lines under cron, OUT/progress*.json.

Progress counts answered samples and their images, so a job of one big shard moves
too. The total is counted in the background from what is cheap to read (a parquet
footer, a local tar's headers, a folder shard's list) and extrapolated over shards that
are not; the ETA divides the images left by this run's images per second.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tarfile
import threading
import time
from typing import Any

from ..records import Shard
from ..sources.webdataset import split_member_name
from .job import PreparedJob
from .stats import RunStats


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def compact(number: float) -> str:
    """1234 -> 1234, 123456 -> 123.5k, 12345678 -> 12.3M: counts that fit a narrow column."""
    if number < 100_000:
        return str(int(number))
    if number < 10_000_000:
        return f"{number / 1000:.1f}k"
    return f"{number / 1_000_000:.1f}M"


def count_samples(shard: Shard) -> int | None:
    """A shard's sample count when it is cheap to know (None for compressed, remote or unreadable ones)."""
    if shard.format == "folder":
        return len(shard.members) or None
    if "://" in shard.url or shard.url.startswith("pipe:"):
        return None
    try:
        if shard.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(shard.url).metadata.num_rows
        if shard.format == "webdataset" and shard.url.endswith(".tar"):
            keys: set[str] = set()
            with tarfile.open(shard.url, "r:") as archive:  # headers only: member data is skipped
                for member in archive:
                    split = split_member_name(member.name) if member.isfile() else None
                    if split:
                        keys.add(split[0])
            return len(keys)
    except Exception:  # noqa: BLE001 - a shard the reader will report as bad: no estimate
        return None
    return None


class SampleTotal:
    """The samples of the shards to do, counted in a background thread as the run starts."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self.counted: list[int] = []
        self.tried = 0
        self._thread = threading.Thread(target=self._count, name="dvl-count", daemon=True)
        if shards:
            self._thread.start()

    def _count(self) -> None:
        for shard in self.shards:
            number = count_samples(shard)
            if number is not None:
                self.counted.append(number)
            self.tried += 1

    def estimate(self) -> float | None:
        """Counted samples, plus their mean for each shard not counted; None while nothing is known."""
        counted = list(self.counted)
        if not counted:
            return None
        return sum(counted) + (len(self.shards) - len(counted)) * sum(counted) / len(counted)


class _Clock:
    """Rate and ETA of a run, timed from the first report of a sample taken by an engine.

    The reporter starts before the model loads (and the engines of --gpus or Ray load
    theirs in their own processes); counting from then, the first lines showed a rate
    diluted by the load, far below what the engine does. The engines report their first
    sample at once (runtime/assembly.py), so the clock starts when they start producing.
    """

    def __init__(self) -> None:
        self.started: float | None = None  # set by the first report with a sample taken
        self.total = 0
        self.done_before = 0
        self.samples: SampleTotal | None = None

    def observe(self, stats: RunStats) -> None:
        if self.started is None and stats.samples:
            self.started = time.monotonic()

    def rates(self, stats: RunStats) -> tuple[float, float, str]:
        """Seconds so far, images per second, and the ETA from the images still to answer."""
        self.observe(stats)
        if self.started is None:  # nothing taken yet: the model is loading or the decoders are starting
            return 0.0, 0.0, "?"
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = stats.images / elapsed
        remaining_shards = self.total - self.done_before - stats.shards_written
        if remaining_shards <= 0:
            return elapsed, rate, "0s"
        total = self.samples.estimate() if self.samples else None
        if total is not None and stats.answered and rate > 0:
            per_sample = stats.images / stats.answered  # images per sample so far
            left = max(total - stats.answered, 0) * per_sample
            return elapsed, rate, _eta(left / rate)
        per_shard = elapsed / stats.shards_written if stats.shards_written else float("inf")
        return elapsed, rate, _eta(remaining_shards * per_shard)

    def sample_total(self) -> int | None:
        total = self.samples.estimate() if self.samples else None
        return None if total is None else round(total)


class NullReporter(_Clock):
    def start(self, total_shards: int, done_before: int, label: str, todo: list[Shard] | None = None) -> None:
        self.total, self.done_before = total_shards, done_before
        if todo:
            self.samples = SampleTotal(todo)

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
        self.label = ""

    def start(self, total_shards: int, done_before: int, label: str, todo: list[Shard] | None = None) -> None:
        super().start(total_shards, done_before, label, todo)
        self.label = label.split(" ", 1)[0]
        print(f"[dvl-batch] {label}: {total_shards - done_before} of {total_shards} shards to do", file=sys.stderr)

    def line(self, stats: RunStats) -> str:
        _, rate, eta = self.rates(stats)
        total = self.sample_total()
        samples = f"{stats.answered}/{total}" if total is not None else str(stats.answered)
        return (
            f"[dvl-batch] {self.label}: {samples} samples ({stats.images} images), "
            f"shards {self.done_before + stats.shards_written}/{self.total}, {stats.error_rows} error rows, "
            f"{rate:.1f} img/s, ETA {eta}"
        )

    def update(self, stats: RunStats) -> None:
        self.observe(stats)  # every report, not only those that print a line
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        print(self.line(stats), file=sys.stderr, flush=True)


class RichReporter(NullReporter):
    """A rich progress bar over samples (shards until their size is known) with images/s and ETA.

    Fits an 80-column terminal: a short description, the bar, images done/total, img/s, ETA.
    """

    def __init__(self, console=None) -> None:
        super().__init__()
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]}"),
            TextColumn("[cyan]{task.fields[rate]} img/s"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            transient=False,
            redirect_stderr=False,
        )
        self.task = None

    def start(self, total_shards: int, done_before: int, label: str, todo: list[Shard] | None = None) -> None:
        super().start(total_shards, done_before, label, todo)
        self.progress.start()
        short = label.split(" ", 1)[0][:12]
        self.task = self.progress.add_task(short, total=None, count="0 img", rate="-", eta="?")

    def update(self, stats: RunStats) -> None:
        _, rate, eta = self.rates(stats)
        total = self.sample_total()
        if total is not None:  # the bar over samples; the count in images
            per_sample = stats.images / stats.answered if stats.answered else 1.0
            count = f"{compact(stats.images)}/{compact(round(total * per_sample))} img"
            self.progress.update(self.task, completed=stats.answered, total=max(total, stats.answered))
        else:
            count = f"{compact(stats.images)} img"
            done = self.done_before + stats.shards_written
            self.progress.update(self.task, completed=done, total=self.total)
        self.progress.update(self.task, count=count, rate=f"{rate:.1f}", eta=eta)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(enabled: bool) -> NullReporter:
    if not enabled:
        return NullReporter()
    return RichReporter() if sys.stderr.isatty() else LogReporter()


# What a run that found nothing to do carries over from the last run that did work.
LAST_WORK = ("started", "samples_this_run", "images_this_run", "rows_this_run", "error_rows_this_run", "images_per_second",
             "images_per_second_working")


class ProgressFile:
    """Keeps OUT/progress*.json current (at most every few seconds) for `dvl-batch status`."""

    def __init__(self, job: PreparedJob, interval: float = 5.0, started: float | None = None):
        """`started` (epoch seconds, default now) is when the run began: the session passes its
        own start, so the whole-run rate here and the run summary's throughput share one clock
        (preparing the job, e.g. building the offline model, happens before this file exists)."""
        self.job, self.interval = job, interval
        self.started = time.time() if started is None else started
        self.first_sample: float | None = None  # when the engine took its first sample (the model is loaded)
        self.last = 0.0

    def observe(self, stats: RunStats) -> None:
        """Note when the first sample was taken (called on every update, not only on writes)."""
        if self.first_sample is None and stats.samples:
            self.first_sample = time.time()

    def working_rate(self, stats: RunStats) -> float | None:
        """Images per second since the engine's first sample: without the model load that
        `images_per_second` (the whole run) includes, so closer to the rate a long job settles
        at. The slot engine compiles and captures its graphs after that sample, so those still count."""
        self.observe(stats)
        if self.first_sample is None or not stats.images:
            return None
        return round(stats.images / max(time.time() - self.first_sample, 1e-9), 3)

    def record(self, stats: RunStats, state: str) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        return {
            "state": state,
            "model": self.job.model.label,
            "shards_total": len(self.job.shards),
            "shards_done": self.job.done_before + stats.shards_written,
            "samples_this_run": stats.samples,
            "images_this_run": stats.images,
            "rows_this_run": stats.rows,
            "error_rows_this_run": stats.error_rows,
            "images_per_second": round(stats.images / elapsed, 3),
            "images_per_second_working": self.working_rate(stats),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "rank": self.job.spec.run.rank,
            "world_size": self.job.spec.run.world_size,
            "runner": self.job.spec.run.runner,
            "gpus": self.job.spec.run.gpus,
        }

    def nothing_to_do(self) -> None:
        """Record a run that found every shard done, keeping the last working run's figures.

        A cron rerun that finds nothing new used to write its own zeros, so `status` showed
        0 img/s until the next run with work. The record says `nothing_to_do` and keeps
        `started`, the counts and the rate of the run before (carried over by every no-op
        run after it); with no readable earlier record of a run that answered images (none,
        one that does not parse: it is only a report, or a failed run's zeros) the rate is
        unknown (None).
        """
        record = self.record(RunStats(), "finished")
        try:
            previous = json.loads(self.job.out.progress_file.read_text())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and previous.get("images_per_second") is not None and previous.get("images_this_run"):
            record.update({key: previous[key] for key in LAST_WORK if key in previous})
        else:
            record["images_per_second"] = None
        record["nothing_to_do"] = True
        self.job.out.write_progress(record)

    def update(self, stats: RunStats, force: bool = False, state: str = "running") -> None:
        self.observe(stats)
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            self.job.out.write_progress(self.record(stats, state))
