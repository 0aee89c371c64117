"""The run path every front end shares: launch defaults, checks, job preparation, a runner, results.

`run_job` is what `dvl_batch.run`, the CLI's caption/vqa/run commands and scripts
get alike: rank and world size from the launcher's environment, `RAY_ADDRESS`, the
check for inputs and an output folder, the lock, signals that finish in-flight
shards, progress files, and `output.strict`. Runners only schedule shards.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.launch import default_cache_dir, hub_offline, parse_gpus, use_compile_cache, with_launch_defaults
from ..config.spec import JobSpec
from ..errors import EXIT_ERROR_ROWS, EXIT_FAILED, DvlError, StopNow, UsageError
from ..sink.parts import error_rows
from .job import PreparedJob, prepare_job
from .progress import NullReporter, ProgressFile, make_reporter
from .quiet import quiet_libraries
from .stats import RunStats, StopFlag


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


class FinishedWithProblemsError(DvlError):
    """The run finished, but its outcome is an error; the run's result is attached."""

    def __init__(self, message: str, result: JobResult):
        super().__init__(message)
        self.result = result


class ErrorRowsError(FinishedWithProblemsError):
    """`output.strict` and OUT holds error rows (earlier runs' rows count too); the run itself finished."""

    exit_code = EXIT_ERROR_ROWS


class UnreadableShardsError(FinishedWithProblemsError):
    """Shards that still could not be read after their retries have no part (the next run
    retries them); the rest of the run finished and its result is attached."""

    exit_code = EXIT_FAILED


class _Signals:
    """First SIGINT/SIGTERM: take no new samples, save every answered row. Second: stop at once."""

    def __init__(self, stop: StopFlag, say: Callable[[str], None]):
        self.stop, self.say = stop, say
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.stop.requested:
            raise StopNow
        self.stop.requested = True
        self.stop.reason = signal.Signals(signum).name
        self.say(f"{self.stop.reason} received: saving the rows answered so far, then exiting (again to abort now)")

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def pick_runner(spec: JobSpec):
    """Ray when asked, one process per engine for `--gpus all` or several devices, else this process."""
    if spec.run.runner == "ray":
        from .runners.ray import run_ray

        return run_ray
    request = parse_gpus(spec.run.gpus) if spec.run.gpus else None
    if request is not None and (request.every or len(request.entries) > 1):
        from .runners.multigpu import run_multi_gpu

        return run_multi_gpu
    from .runners.local import run_local

    return run_local


def checked_spec(spec: JobSpec) -> JobSpec:
    """The spec with the launcher's defaults filled in, refused when it has nothing to read or nowhere to write."""
    spec = with_launch_defaults(spec)
    if not spec.data.inputs:
        raise UsageError("no input given: pass shard files, folders or patterns (or 'data.inputs' in the recipe)")
    if not spec.output.path:
        raise UsageError("no output folder: pass -o/--output OUT (or 'output.path' in the recipe, output= in Python)")
    return spec


def _check_strict(spec: JobSpec, result: JobResult) -> None:
    if not spec.output.strict or result.interrupted:
        return
    found = error_rows(result.out)  # all parts count, so a resumed run still reports errors written earlier
    if found:
        raise ErrorRowsError(f"strict mode: {found} rows have errors ({result.stats.error_rows} written by this run)", result)


def run_job(
    spec: JobSpec,
    *,
    reporter: NullReporter | None = None,
    cache_dir: Path | None = None,
    offline: bool | None = None,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> JobResult:
    """Run a job to completion (or until interrupted); resumable by running it again.

    Raises UsageError before touching anything for a spec without inputs or output
    folder, UnreadableShardsError (exit 1) after the run when shards could not be read
    even after retries, and ErrorRowsError when `output.strict` finds error rows.
    """
    started = time.perf_counter()
    spec = checked_spec(spec)
    quiet_libraries(spec.run.verbose)
    if spec.run.world_size > 1:
        say(f"rank {spec.run.rank} of {spec.run.world_size}: this run does the shards that belong to rank {spec.run.rank}")
    cache = Path(spec.model.cache_dir) if spec.model.cache_dir else (cache_dir or default_cache_dir())
    job = prepare_job(spec, cache, hub_offline() if offline is None else offline)
    use_compile_cache(cache)
    result = _run_prepared(job, reporter or make_reporter(spec.run.progress), say, started)
    unreadable = result.stats.unreadable
    if unreadable and not result.interrupted:
        raise UnreadableShardsError(f"{len(unreadable)} shards could not be read and have no part; "
                                    "rerun the same command to retry them", result)
    _check_strict(spec, result)
    return result


def _run_prepared(job: PreparedJob, reporter: NullReporter, say: Callable[[str], None], started: float) -> JobResult:
    spec = job.spec
    progress_file = ProgressFile(job, started=time.time() - (time.perf_counter() - started))
    stop = StopFlag()
    stats = RunStats()
    state = "failed"
    try:
        if job.model.notice:
            say(job.model.notice)
        for notice in job.notices:
            say(notice)
        if not job.todo:  # nothing to do: no model to load, no progress to show
            state = "nothing to do"
            return _result(job, stats, started, False)
        runner = pick_runner(spec)
        reporter.start(len(job.shards), job.done_before, f"{spec.prompt.task} with {job.model.label}", job.todo)

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
            if state == "nothing to do":  # the last working run's figures stay in progress.json
                progress_file.nothing_to_do()
            else:
                progress_file.update(stats, force=True, state=state)
        finally:
            job.release()
    return _result(job, stats, started, stop.requested)


def _result(job: PreparedJob, stats: RunStats, started: float, interrupted: bool) -> JobResult:
    return JobResult(
        stats=stats,
        out=job.out.root,
        model=job.model.label,
        shards_total=len(job.shards),
        shards_done_before=job.done_before,
        seconds=time.perf_counter() - started,
        interrupted=interrupted,
        notice=job.model.notice,
    )
