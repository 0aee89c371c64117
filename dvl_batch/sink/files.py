"""Whole-or-nothing file writes for everything in OUT: parts, job.json, progress, the folder manifest."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import OutputError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def explain_os_error(exc: OSError, path: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device holding {path.parent}; free space and rerun to resume")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write to {path.parent}: {exc.strerror}")
    return OutputError(f"writing {path} failed: {exc.strerror or exc}")


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a whole file or nothing: `write(handle)` to a temp name, fsync, rename, fsync
    the folder. A failure (disk full, read-only) becomes a one-line OutputError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise explain_os_error(exc, path) from exc
    except BaseException:  # a second Ctrl-C mid-write: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())
