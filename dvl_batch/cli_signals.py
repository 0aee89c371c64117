"""How the command meets stop signals outside a job's own handling (which is `runtime.session`'s).

SIGTERM during start-up (imports, model loading) stops the command like Ctrl-C: one line and
exit 130 instead of a silent death or a traceback; once a job has ended, the signals change
nothing more.
"""

from __future__ import annotations

import signal

import typer

from .errors import StopNow, caused_by_stop


def terminate_as_interrupt(signum, frame) -> None:
    """The SIGTERM handler until a job installs its own: stop now, as Ctrl-C does."""
    raise StopNow


def stopped_by_signal(exc: BaseException) -> bool:
    """An interrupt, or an error it caused (not an exit already decided on)."""
    return not isinstance(exc, (SystemExit, typer.Exit)) and caused_by_stop(exc)


def ignore_stop_signals() -> None:
    """Once a job has ended SIGTERM/SIGINT change nothing (during the summary or torch's 1-1.5 s
    teardown they turned a finished run's exit into 130, -15 or -2); SIGKILL still works."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN), signal.signal(signal.SIGINT, signal.SIG_IGN)
