"""The locks that keep two runs from writing one OUT: one per rank, one per world size."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from ..errors import LockHeldError
from .files import explain_os_error


class RunLock:
    """An exclusive POSIX record lock (fcntl) on a file in OUT.

    The kernel drops it when the owning process dies, so a lock left by a SIGKILLed
    run is harmless: the next run acquires it. Unlike flock, a record lock belongs
    to the process, not the file descriptor, so forked decoder workers that outlive
    a killed parent for a few seconds do not keep holding it. The file also records
    who holds it, for the error message of a second run.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = False) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise explain_os_error(exc, self.path) from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LockHeldError(f"another dvl-batch run holds {self.path.parent} ({holder}); exiting") from None
        self.fd = fd
        try:  # who holds it, for the message of a second run; the lock itself is what counts
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        except OSError:
            pass

    def probe(self) -> None:
        """Raise LockHeldError if another process holds the lock; never creates the file."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no lock file (or unreadable: acquire() will say why)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            raise LockHeldError(f"another dvl-batch run holds {self.path.parent} ({holder}); exiting") from None
        finally:
            os.close(fd)  # also drops the lock just taken

    def holder(self) -> int | None:
        """The pid of the live process holding this lock, or None (never taken, or its holder died)."""
        return lock_holder(self.path)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class WorldLock:
    """Lets the ranks of one `--world-size` share OUT and refuses runs with another.

    Each rank has its own exclusive lock, so ranks of one world never collide. A run
    with a different world size would assign shards differently and redo (or fight
    over) shards another rank owns. Every run therefore holds a shared record lock on
    byte `world_size` of `OUT/.world.lock` and, once, checks that nobody holds any
    other byte. The check briefly locks the other bytes itself, so runs must check one
    at a time (OutputDir.prepare does it under OUT/.job.lock): otherwise two ranks
    starting together could mistake each other's check for another world.
    """

    def __init__(self, path: Path, world_size: int):
        self.path, self.world_size = path, world_size
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise explain_os_error(exc, self.path) from exc
        w = self.world_size
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, w)
            for length, start in ((w, 0), (0, w + 1)):  # every byte but ours; length 0 = to the end
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
        except (BlockingIOError, PermissionError):
            os.close(fd)  # drops our shared byte too
            raise LockHeldError(
                f"{self.path.parent} is in use by a dvl-batch run with a different --world-size; "
                "wait for it or use another output folder"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_holder(path: Path) -> int | None:
    """The pid of a live process holding a lock on `path`, or None (never taken, or its holder died).

    Asks the kernel (F_GETLK) without taking the lock, so a starting run is never refused.
    """
    import struct

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else (pid or -1)
