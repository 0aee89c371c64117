"""How a prepared sample crosses from a decoder process to the device process.

A 384px sample is ~440 KB of pixels (3 MB with the 7B model's 1024px view). Sent through
the DataLoader's pipe, such a message is written in many pieces, and a decoder that dies
mid-write (OOM killer, a native crash in an image library, a killed Ray actor's children)
leaves half a message behind: the reader then blocks forever on the rest. torch tensors
avoid that by going through shared memory, but each one costs a file-descriptor handshake
(~2 ms) in the device process.

So decoders *spill* large items into a file on tmpfs (`/dev/shm`) and send only its path,
a message small enough to be written atomically. The device process reads and deletes
the file while unpickling the message. Spill files live in one directory per decoder
pool, removed with the pool; directories of dead runs are swept at the next start.
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..processes import process_alive

SPILL_PREFIX = "dvl-batch-spill-"
SPILL_ABOVE_BYTES = 2048  # smaller messages go through the pipe as they are (atomic below PIPE_BUF)


def _unspill(path: str) -> Any:
    """Runs in the receiving process while it unpickles a `Spilled`: read, delete, load."""
    with open(path, "rb") as handle:
        data = handle.read()
    os.unlink(path)
    return pickle.loads(data)


class Spilled:
    """A message that stands for an object in a spill file; unpickling it yields the object."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _unspill, (self.path,)


def _spill_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def sweep_stale_spill_dirs(root: Path) -> None:
    """Remove spill directories whose owning process is gone (it was SIGKILLed)."""
    for path in root.glob(f"{SPILL_PREFIX}*"):
        try:
            owner = int(path.name[len(SPILL_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if owner != os.getpid() and not process_alive(owner):
            shutil.rmtree(path, ignore_errors=True)


class SpillDir:
    """A decoder pool's spill directory, created by the device process before it forks decoders."""

    def __init__(self, root: Path | None = None):
        root = root or _spill_root()
        sweep_stale_spill_dirs(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=root))
        self._counter = itertools.count()

    def wrap(self, item: Any) -> Any:
        """In a decoder: `item` itself if small, else a `Spilled` pointing at its file.

        Falls back to sending the item through the pipe when the spill file cannot be
        written (tmpfs full): slower and less robust to a mid-write death, but no failure.
        """
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) <= SPILL_ABOVE_BYTES:
            return item
        path = self.path / f"{os.getpid()}-{next(self._counter)}"
        try:
            with open(path, "xb") as handle:
                handle.write(data)
        except OSError:
            path.unlink(missing_ok=True)
            return item
        return Spilled(str(path))

    def clear(self) -> None:
        """Drop files a dead pool left unread (its queue is discarded; the shards are resumed)."""
        for path in self.path.iterdir():
            path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
