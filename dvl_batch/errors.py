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


class InterruptedRun(DvlError):
    """SIGINT/SIGTERM stopped the run after it saved every finished shard."""

    exit_code = EXIT_INTERRUPTED
