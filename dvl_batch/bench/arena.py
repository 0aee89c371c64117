"""The bench's decoded samples, kept where the measured run's decoder forks do not copy them.

The generate baseline needs every sample decoded in memory (4096 x ~0.44 MB of pixels for
the caption profile), and the bench process holds them while dvl-batch's measured run forks
its decoder pool. A fork copies the page tables of everything the parent has touched: on the
dev box, 15 decoders delivered their first item 0.12-0.15 s after the pool was created from a
lean process, 0.30-0.46 s with the caption profile's 4096 samples in memory, and 0.12-0.13 s once
they were moved here. A job's process never holds decoded images, so the bench keeps them in one mapping
marked MADV_DONTFORK (children do not inherit it; they never read it) and hands the heap they
leave back to the system; the generate baseline, in this process, reads them as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
from typing import Any

import numpy as np


def keep_out_of_forks(samples: list[Any]) -> mmap.mmap | None:
    """Move every sample's pixel arrays into one private mapping that forked processes do not
    inherit; returns the mapping (the moved arrays hold it alive), or None where the platform
    cannot mark one (the samples are then left as they are)."""
    places = [(s, name) for s in samples for name in (getattr(s, "pixels", None) or {})]
    total = sum(_aligned(s.pixels[name].nbytes) for s, name in places)
    if not total or not hasattr(mmap, "MADV_DONTFORK"):
        return None
    arena = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        arena.madvise(mmap.MADV_DONTFORK)
    except OSError:
        arena.close()
        return None
    offset = 0
    for sample, name in places:  # each original is freed as soon as it is copied: no second full set
        array = sample.pixels[name]
        view = np.frombuffer(arena, dtype=array.dtype, count=array.size, offset=offset).reshape(array.shape)
        view[...] = array
        sample.pixels[name] = view
        offset += _aligned(array.nbytes)
    del array
    _trim_heap()
    return arena


def _trim_heap() -> None:
    """Return the heap the moved arrays leave behind to the system (glibc's malloc_trim): freed
    but still mapped, its pages would be copied at every fork all the same. Elsewhere, a no-op."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to trim this way
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def _aligned(size: int, to: int = 64) -> int:
    """`size` rounded up so that every array starts on a cache line, whatever its dtype."""
    return -(-size // to) * to
