"""The bench keeps its decoded samples in a mapping that forked decoders do not inherit."""

from __future__ import annotations

import mmap
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from dvl_batch.bench.arena import keep_out_of_forks


def _mapped_in_child(address: int) -> bool:
    """Whether a forked child has `address` in its memory map (read from /proc, never touched)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running any Python teardown
        os.close(read)
        found = False
        with open("/proc/self/maps") as maps:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                found = found or start <= address < end
        os.write(write, b"1" if found else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    return answer == b"1"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTFORK"),
                    reason="MADV_DONTFORK and /proc are Linux's")
def test_samples_keep_their_pixels_in_one_mapping_that_forks_do_not_inherit():
    rng = np.random.default_rng(0)
    pixels = [{"siglip": rng.integers(0, 255, (1, 3, 8, 8), dtype=np.uint8),
               "sam": rng.random((1, 3, 4, 4), dtype=np.float32)} for _ in range(5)]
    samples = [SimpleNamespace(pixels={k: v.copy() for k, v in p.items()}) for p in pixels]
    samples.append(SimpleNamespace(pixels=None))  # an error sample: nothing to move
    arena = keep_out_of_forks(samples)
    assert arena is not None
    for sample, original in zip(samples, pixels, strict=False):
        for name, array in original.items():
            moved = sample.pixels[name]
            np.testing.assert_array_equal(moved, array)
            assert moved.dtype == array.dtype and moved.flags.writeable
            assert moved.ctypes.data % 64 == 0  # every array starts on a cache line
    address = samples[0].pixels["siglip"].ctypes.data
    assert not _mapped_in_child(address), "a forked decoder must not inherit the bench's samples"
    ordinary = np.ones(1 << 20, dtype=np.uint8)
    assert _mapped_in_child(ordinary.ctypes.data)  # (the probe does see ordinary memory)


def test_nothing_to_move_leaves_the_samples_alone():
    samples = [SimpleNamespace(pixels=None), SimpleNamespace(pixels={})]
    assert keep_out_of_forks(samples) is None
    assert samples[0].pixels is None and samples[1].pixels == {}
