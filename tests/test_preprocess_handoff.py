"""Spill files: how large prepared samples cross from decoder processes to the device process."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np

from dvl_batch.preprocess.handoff import SPILL_PREFIX, SpillDir, Spilled, sweep_stale_spill_dirs
from dvl_batch.records import PreparedSample, PromptRequest


def _sample(side: int = 384) -> PreparedSample:
    pixels = {"image": np.random.default_rng(0).integers(0, 255, (1, 3, side, side), dtype=np.uint8)}
    return PreparedSample("shard-0", "key-0", 3, pixels, [PromptRequest("q?", list(range(616)), 600)])


def test_a_large_sample_travels_as_a_small_message_and_its_file_is_deleted_on_receipt(tmp_path):
    spill = SpillDir(tmp_path)
    sample = _sample()
    wrapped = spill.wrap(sample)
    assert isinstance(wrapped, Spilled)
    message = pickle.dumps(wrapped)
    assert len(message) < 512  # written to the pipe atomically
    assert len(list(spill.path.iterdir())) == 1
    received = pickle.loads(message)
    assert not list(spill.path.iterdir())
    assert received.key == "key-0" and received.requests[0].input_ids == list(range(616))
    np.testing.assert_array_equal(received.pixels["image"], sample.pixels["image"])
    spill.remove()
    assert not spill.path.exists()


def test_small_items_are_sent_as_they_are(tmp_path):
    spill = SpillDir(tmp_path)
    error_row = PreparedSample("shard-0", "bad", 0, error="cannot identify image file")
    assert spill.wrap(error_row) is error_row
    assert not list(spill.path.iterdir())


def test_an_unwritable_spill_dir_falls_back_to_the_pipe(tmp_path):
    spill = SpillDir(tmp_path)
    spill.remove()  # e.g. tmpfs full or gone: writing fails
    sample = _sample(64)
    assert spill.wrap(sample) is sample


def test_clear_drops_what_a_dead_pool_left_unread(tmp_path):
    spill = SpillDir(tmp_path)
    spill.wrap(_sample(64))
    spill.wrap(_sample(64))
    assert len(list(spill.path.iterdir())) == 2
    spill.clear()
    assert spill.path.is_dir() and not list(spill.path.iterdir())


def test_spill_dirs_of_dead_runs_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{SPILL_PREFIX}{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "1-0").write_bytes(b"x" * 10)
    live = tmp_path / f"{SPILL_PREFIX}{os.getppid()}-def"
    live.mkdir()
    unrelated = tmp_path / f"{SPILL_PREFIX}notapid"
    unrelated.mkdir()
    sweep_stale_spill_dirs(tmp_path)
    assert not stale.exists() and live.exists() and unrelated.exists()
