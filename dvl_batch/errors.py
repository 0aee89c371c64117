"""Exceptions that end a job, each tied to the process exit code a scheduler sees.

Cron jobs and SLURM arrays decide what to do from the exit code alone, so every
failure the user can cause or fix maps to one documented code (README, "Exit codes").
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_ERROR_ROWS = 4
EXIT_INTERRUPTED = 130


class DvlError(Exception):
    """A failure with a one-line message meant for the user, never a traceback."""

    exit_code = EXIT_FAILED


class UsageError(DvlError):
    """Bad configuration or arguments: fix the command line or the recipe."""

    exit_code = EXIT_USAGE


class LockHeldError(DvlError):
    """Another live run owns the output folder; this run did nothing."""

    exit_code = EXIT_LOCKED


class OutputError(DvlError):
    """The output folder cannot be written (full disk, read-only mount, permissions)."""

    exit_code = EXIT_FAILED


class StopNow(KeyboardInterrupt):  # noqa: N818 - it is an interrupt, like the one it stands for
    """A signal that must stop the process at once: SIGTERM before a job's own handling (start-up,
    model loading) or a second SIGINT/SIGTERM during one. Caught wherever KeyboardInterrupt is.

    Raised instead of KeyboardInterrupt itself: measured on the dev box, when a plain
    KeyboardInterrupt from a SIGTERM handler landed in the imports of start-up (~0.4-0.6 s after
    the lock), 13 of ~120 runs printed the "aborted" line and asked for exit 130 but then died
    by SIGINT (-2) in the interpreter's exit; with this subclass, 0 of 120.
    """


def caused_by_stop(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised because of or while handling, a StopNow/KeyboardInterrupt
    (an interrupt that lands inside a class body during an import comes out as a RuntimeError).
    A context hidden with `raise ... from None` does not count."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


class InterruptedRun(DvlError):
    """SIGINT/SIGTERM stopped the run after it saved every finished shard."""

    exit_code = EXIT_INTERRUPTED
