"""decoder_pool end to end: a decoder process that dies costs a restart, not the job.

The real command runs with decoder processes; one is killed from outside, or crashes with
SIGSEGV on a poison image (injected by tests/support/sitecustomize.py, as a bug in a native
image library would). Every sample still gets exactly one row.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from .cli_processes import Run, fault_env
from .conftest import example_images, read_rows, write_image_shard

POISON = "DVL-TEST-POISON"


def write_shards(folder: Path, poison_key: str | None = None) -> list[str]:
    photos = list(example_images().values())
    keys = []
    for s in range(3):
        images = {f"s{s}_{i}": photos[(2 * s + i) % len(photos)] for i in range(2)}
        if poison_key in images:
            images[poison_key] += POISON.encode()  # bytes after the JPEG's end: a valid image otherwise
        write_image_shard(folder / f"shard-{s}.tar", images)
        keys += list(images)
    return keys


def caption_args(data: Path, out: Path, workers: int) -> list[str]:
    return ["caption", str(data), "-o", str(out), "--model", "tiny", "--max-new-tokens", "3", "--workers", str(workers),
            "--no-progress"]


def restarts_in(stderr: str) -> int:
    lines = [line for line in stderr.splitlines() if "decoder processes restarted" in line]
    return int(lines[0].split()[-2]) if lines else 0


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


@pytest.fixture(scope="module")
def poison_run(tmp_path_factory, cache_dir, tiny_model_dir):
    """The poison-image run, started as soon as a test of this module asks for it and checked by
    test_poison_image_that_kills_its_decoder_becomes_an_error_row. Most of its time is spent
    waiting for dead decoders to be noticed, so the decoder-killing test asks for it too and runs
    alongside it (the two runs share nothing but the tiny model)."""
    root = tmp_path_factory.mktemp("poison")
    keys = write_shards(root / "data", poison_key="s1_1")
    out = root / "out"
    run = Run(caption_args(root / "data", out, workers=2), fault_env(cache_dir, {"crash_on_bytes": POISON}))
    yield run, keys, out
    if run.proc.poll() is None:
        run.proc.kill()
        run.wait()


@pytest.mark.slow
def test_decoder_killed_from_outside_is_replaced_and_no_sample_is_lost(tmp_path, cache_dir, tiny_model_dir, poison_run):
    # (poison_run: the poison test's run goes on alongside this one)
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/PID/task/TID/children to find the decoder processes")
    keys = write_shards(tmp_path / "data")
    out = tmp_path / "out"
    # each decoder's first image takes 1 s (the rest run at full speed); the decoder says when it
    # starts it, so it is killed mid-image however fast or loaded the machine
    faults = {"slow_image_open": 1.0, "slow_image_opens": 1}
    run = Run(caption_args(tmp_path / "data", out, workers=1), fault_env(cache_dir, faults))
    assert run.wait_for_line("opening an image", timeout=120), run.stderr
    line = run.lines_with("opening an image")[0]
    decoder = int(re.search(r"decoder (\d+) opening", line).group(1))
    assert decoder in child_pids(run.proc.pid), "the announcing process should be a decoder of the run"
    time.sleep(0.3)  # inside the image's 1 s
    os.kill(decoder, signal.SIGKILL)  # a plain SIGKILL, as the kernel's OOM killer sends
    assert run.wait(timeout=300) == 0, run.stderr
    rows = read_rows(out).to_pandas()
    assert sorted(rows["key"]) == sorted(keys) and rows["error"].isna().all()
    assert restarts_in(run.stderr) >= 1


@pytest.mark.slow
def test_poison_image_that_kills_its_decoder_becomes_an_error_row(poison_run):
    run, keys, out = poison_run
    assert run.wait(timeout=300) == 0, run.stderr
    assert len(run.lines_with("crashing")) == 2, run.stderr  # tried twice, then given up
    rows = read_rows(out).to_pandas()
    assert sorted(rows["key"]) == sorted(keys)
    poisoned = rows.set_index("key").loc["s1_1"]
    assert "a decoder process died twice while preparing this sample" in poisoned["error"]
    assert rows.drop(rows.index[rows["key"] == "s1_1"])["error"].isna().all()
    assert restarts_in(run.stderr) == 2


def test_a_shard_left_behind_by_a_decoder_that_moved_on_is_resumed():
    """A decoder that finished reading shard a and took shard b has only b in its slot; a's
    last samples (and its end) may still sit in the loader's queue when the pool dies. a must
    be resumed from what was delivered, not dropped; shards that ended stay ended."""
    from collections import Counter

    from dvl_batch.preprocess.decoder_pool import WorkerSlots, _Delivered, _in_flight
    from dvl_batch.records import PreparedSample, Shard, ShardEnd

    shards = [Shard(f"s{i}", f"s{i}.tar", "webdataset") for i in range(4)]
    slots = WorkerSlots(1, len(shards))
    slots.register(0)
    delivered = _Delivered()
    slots.working_on(0, 0)
    delivered.saw(PreparedSample(shard_id="s0", key="k", index=0))
    delivered.saw(ShardEnd(shards[0], 1))  # s0 ended
    slots.working_on(0, 1)
    delivered.saw(PreparedSample(shard_id="s1", key="k", index=0))  # s1's later samples still queued
    slots.working_on(0, 2)  # the decoder moved on to s2
    points = _in_flight(slots, shards, [], delivered, Counter(), "died")
    assert {p.shard.id: p.start for p in points} == {"s1": 1, "s2": 0}
