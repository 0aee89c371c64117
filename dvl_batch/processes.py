"""Child processes that die with the process that started them (Linux), and whether a process lives."""

from __future__ import annotations

import os
import signal


def die_with_parent(parent_pid: int, exit_code: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies, even by SIGKILL.

    An orphan keeps the parent's inherited sockets and files open: a killed Ray actor is not
    seen as dead while its decoders live on, and a new run must not find an orphaned engine
    still writing parts. If the parent is already gone, exit at once with `exit_code`.
    Returns False where the kernel offers no such request (not Linux).
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(exit_code)
    return True


def process_alive(pid: int) -> bool:
    """True for a running process; false for a gone or zombie (dead, not yet reaped) one."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
