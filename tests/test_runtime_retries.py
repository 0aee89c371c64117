"""Transient read failures are retried; a shard that still cannot be read has no part and is
retried by the next run; a usage error in a decoder-fed setting ends the run at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvl_batch.errors import EXIT_FAILED, EXIT_USAGE

from .conftest import cli_env, example_images, many_shards, read_rows, write_parquet


def caption(inputs: list[str], out: Path, *extra: str) -> list[str]:
    return ["caption", *inputs, "-o", str(out), "--model", "tiny", "--max-new-tokens", "2", "--workers", "1",
            "--no-progress", *extra]


def run(args: list[str], cache_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvl_batch", *args], env=cli_env(cache_dir), capture_output=True,
                          text=True, timeout=timeout)


def failing_twice_case(folder: Path) -> tuple[list[str], Path]:
    """A pipe: shard whose command cuts the stream after 2000 bytes twice, as a dropped connection would."""
    (shard,) = many_shards(folder / "data", 1, 3)
    counter = folder / "attempts"
    counter.write_text("0")
    script = folder / "fetch.sh"
    script.write_text(f"n=$(cat {counter}); echo $((n+1)) > {counter}\n"
                      "if [ $n -ge 2 ]; then cat $1; else head -c 2000 $1; echo 'connection reset' >&2; exit 56; fi\n")
    return caption([f"pipe:sh {script} {shard}"], folder / "out"), counter


def always_failing_case(folder: Path) -> tuple[list[str], Path]:
    """A good shard and a pipe: shard that fails until the flag file `network-is-back` exists."""
    good, bad = many_shards(folder / "data", 2, 2)
    flag = folder / "network-is-back"
    script = folder / "fetch.sh"
    script.write_text(f"if [ -f {flag} ]; then cat $1; else echo 'Could not resolve host' >&2; exit 6; fi\n")
    return caption([str(good), f"pipe:sh {script} {bad}"], folder / "out", "--read-retries", "1"), flag


def remote_failing_once_case(folder: Path) -> list[str]:
    """A remote parquet shard whose copy is cut short on the first try."""
    path = _parquet_shard(folder)
    counter = folder / "attempts"
    counter.write_text("0")
    script = folder / "fetch.sh"
    script.write_text(f"n=$(cat {counter}); echo $((n+1)) > {counter}\n"
                      "if [ $n -ge 1 ]; then cat $1; else head -c 100 $1; echo 'connection reset' >&2; exit 56; fi\n")
    return caption([f"pipe:sh {script} {path}"], folder / "out")


def watchdog_case(folder: Path) -> list[str]:
    many_shards(folder / "data", 1, 2)
    return caption([str(folder / "data")], folder / "out", "--watchdog-seconds", "2")


@pytest.fixture(scope="module")
def started(tmp_path_factory, cache_dir, tiny_model_dir):
    """The runs of this module's end-to-end tests (the first run, where a test has two), each on
    its own data and OUT, started together (two at a time) on first use: much of their time is
    retry backoff and a watchdog's wait, which overlap instead of queueing. Each test checks its own."""
    from .cli_processes import Overlapped, fault_env

    folders = {name: tmp_path_factory.mktemp(name) for name in ("twice", "always", "remote", "watchdog")}
    twice, twice_counter = failing_twice_case(folders["twice"])
    always, flag = always_failing_case(folders["always"])
    remote = remote_failing_once_case(folders["remote"])
    env = cli_env(cache_dir)
    runs = Overlapped({
        "always": ([sys.executable, "-m", "dvl_batch", *always], env, 300),
        "twice": ([sys.executable, "-m", "dvl_batch", *twice], env, 300),
        "watchdog": ([sys.executable, "-m", "dvl_batch", *watchdog_case(folders["watchdog"])],
                     fault_env(cache_dir, {"slow_image_open": 60}), 120),
        "remote": ([sys.executable, "-m", "dvl_batch", *remote], env, 300),
    })
    yield runs, {"folders": folders, "always": always, "flag": flag, "twice_counter": twice_counter}
    runs.close()


@pytest.mark.slow
def test_pipe_shard_failing_twice_is_answered_in_full(started):
    runs, case = started
    done = runs.result("twice")
    assert done.returncode == 0, done.stderr
    assert case["twice_counter"].read_text().strip() == "3"
    rows = read_rows(case["folders"]["twice"] / "out")
    assert sorted(rows["key"].to_pylist()) == [f"s000_{i:03d}" for i in range(3)]
    assert all(rows["error"].is_null().to_pylist())


@pytest.mark.slow
def test_pipe_shard_that_always_fails_has_no_part_exit_1_and_is_retried_next_run(started, cache_dir):
    runs, case = started
    out = case["folders"]["always"] / "out"
    failed = runs.result("always")
    assert failed.returncode == EXIT_FAILED, failed.stderr
    assert "Traceback" not in failed.stderr and "((" not in failed.stderr and "bufsize" not in failed.stderr
    not_read = [line for line in failed.stderr.splitlines() if line.startswith("not read")]
    assert len(not_read) == 1 and "failed (exit 6): Could not resolve host" in not_read[0], failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rerun the same command to retry" in errors[0], failed.stderr
    assert len(list((out / "parts").glob("*.parquet"))) == 1  # the good shard only
    case["flag"].touch()
    retried = run(case["always"], cache_dir)
    assert retried.returncode == 0, retried.stderr
    keys = sorted(read_rows(out)["key"].to_pylist())
    assert keys == ["s000_000", "s000_001", "s001_000", "s001_001"]


def test_missing_questions_file_with_two_decoders_exits_2_at_once(tmp_path, cache_dir, tiny_model_dir):
    many_shards(tmp_path / "data", 2, 2)
    started = time.monotonic()
    done = run(["vqa", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--model", "tiny", "--workers", "2",
                "--questions-file", str(tmp_path / "missing.jsonl"), "--no-progress"], cache_dir, timeout=30)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert time.monotonic() - started < 30
    assert "Traceback" not in done.stderr and "DataLoader" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        f"error: questions file not found: {tmp_path / 'missing.jsonl'}"]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_a_decoder_ends_the_stream_with_one_line(tmp_path, tiny_model_dir, tiny_processor, workers):
    from dvl_batch.config.spec import spec_from_recipe
    from dvl_batch.preprocess.decoder_pool import DecoderFailure
    from dvl_batch.preprocess.preparer import SamplePreparer
    from dvl_batch.preprocess.stream import prepared_stream
    from dvl_batch.records import Shard
    from dvl_batch.runtime.feed import ShardFeed

    spec = spec_from_recipe(None, inputs=[str(tmp_path)], output=str(tmp_path / "out"), workers=workers)
    feed = ShardFeed([Shard(f"s{i}", f"u{i}", "bogus") for i in range(4)])
    started = time.monotonic()
    stream = prepared_stream(spec, SamplePreparer(spec, str(tiny_model_dir), tiny_processor), feed)
    first = next(stream)
    assert isinstance(first, DecoderFailure), first
    assert first.message == "a decoder process failed: ValueError: unknown shard format bogus"
    assert first.error().exit_code == EXIT_FAILED
    stream.close()
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_watchdog_ends_a_run_that_makes_no_progress(started):
    runs, _ = started
    stalled = runs.result("watchdog")  # every image open takes 60 s: the run stalls at its first
    assert stalled.returncode == EXIT_FAILED, stalled.stderr
    assert runs.seconds["watchdog"] < 60
    errors = [line for line in stalled.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no progress for 2 s" in errors[0], stalled.stderr


def test_api_raises_for_a_shard_that_cannot_be_read_like_the_cli_exits_1(tmp_path, cache_dir, tiny_model_dir):
    """`dvl_batch.run` ends the same way as the command: the readable shard is written, the
    unreadable one is named in an exception with exit code 1 that carries the result."""
    from dvl_batch import run as run_api
    from dvl_batch.api import UnreadableShardsError
    from dvl_batch.config.spec import JobSpec

    good, bad = many_shards(tmp_path / "data", 2, 2)
    script = tmp_path / "fetch.sh"
    script.write_text("echo 'Could not resolve host' >&2; exit 6\n")
    spec = JobSpec.from_recipe(None, inputs=[str(good), f"pipe:sh {script} {bad}"], output=str(tmp_path / "out"),
                               model="tiny", max_new_tokens=2, workers=0, read_retries=0, progress=False)
    with pytest.raises(UnreadableShardsError) as caught:
        run_api(spec, cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert caught.value.exit_code == EXIT_FAILED
    assert caught.value.result.stats.shards_written == 1
    assert len(caught.value.result.stats.unreadable) == 1 and "exit 6" in caught.value.result.stats.unreadable[0]


def _parquet_shard(tmp_path: Path) -> Path:
    images = list(example_images().values())[:3]
    return write_parquet(tmp_path / "data" / "remote.parquet", {"key": ["a", "b", "c"], "image": images})


def test_remote_parquet_shard_is_copied_locally_and_a_failing_copy_is_retried(tmp_path):
    """A parquet file is read from its footer, so a remote one (here a pipe: command) is copied
    to a temporary file first; a copy cut short is retried, and the temporary file is removed."""
    import tempfile

    from dvl_batch.records import RawSample, Shard, ShardEnd
    from dvl_batch.sources.parquet import read_parquet

    path = _parquet_shard(tmp_path)
    counter = tmp_path / "attempts"
    counter.write_text("0")
    script = tmp_path / "fetch.sh"  # a dropped connection on the first try
    script.write_text(f"n=$(cat {counter}); echo $((n+1)) > {counter}\n"
                      "if [ $n -ge 1 ]; then cat $1; else head -c 100 $1; exit 56; fi\n")
    before = set(Path(tempfile.gettempdir()).glob("dvl-batch-*.parquet"))
    shard = Shard("remote", f"pipe:sh {script} {path}", "parquet")
    items = list(read_parquet(shard, None, None, retries=2, backoff=0))
    samples = [i for i in items if isinstance(i, RawSample)]
    assert [s.key for s in samples] == ["a", "b", "c"] and all(s.images and not s.error for s in samples)
    assert isinstance(items[-1], ShardEnd) and not items[-1].unreadable and counter.read_text().strip() == "2"
    assert set(Path(tempfile.gettempdir()).glob("dvl-batch-*.parquet")) == before

    always = Shard("down", "pipe:echo 'Could not resolve host' >&2; exit 6 # x.parquet", "parquet")
    (end,) = list(read_parquet(always, None, None, retries=1, backoff=0))
    assert end.unreadable and "could not be read (2 attempts)" in end.message and "Could not resolve host" in end.message


@pytest.mark.slow
def test_remote_parquet_shard_failing_once_is_answered_in_full(started):
    runs, case = started
    done = runs.result("remote")
    assert done.returncode == 0, done.stderr
    rows = read_rows(case["folders"]["remote"] / "out")
    assert sorted(rows["key"].to_pylist()) == ["a", "b", "c"] and all(rows["error"].is_null().to_pylist())


def test_remote_parquet_copies_of_killed_runs_are_removed_and_a_full_disk_is_refused(tmp_path, monkeypatch):
    """A SIGKILL leaves its copy behind: the next copy removes those of dead processes (never a
    live one's). A copy that would leave less than the reserve free ends the shard unreadable
    with the reason instead of filling the disk."""
    import os
    import tempfile

    from dvl_batch.records import RawSample, Shard, ShardEnd
    from dvl_batch.sources import parquet

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now
    host = parquet._copy_prefix()  # dvl-batch-HOST-
    stale = folder / f"{host}{dead.pid}-abc.parquet"
    live = folder / f"{host}{os.getpid()}-def.parquet"
    other = folder / "dvl-batch-notes.parquet"  # not a copy's name: left alone
    for path in (stale, live, other):
        path.write_bytes(b"x")
    path = _parquet_shard(tmp_path)
    shard = Shard("remote", f"pipe:cat {path}", "parquet")
    items = list(parquet.read_parquet(shard, None, None, retries=0, backoff=0))
    assert len([i for i in items if isinstance(i, RawSample)]) == 3
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, other.name]), "its own copy is removed too"

    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(100 * 2**30, 100 * 2**30 - 2**20, 2**20))  # 1 MiB free
    (end,) = list(parquet.read_parquet(shard, None, None, retries=2, backoff=0))
    assert isinstance(end, ShardEnd) and end.unreadable and "no room to copy the remote parquet shard" in end.message
    assert "(1 attempt)" in end.message, "a lasting failure is not retried, and the message says so"
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, other.name])


def test_copies_of_another_machine_sharing_the_folder_are_kept(tmp_path, monkeypatch):
    import socket
    import tempfile

    from dvl_batch.sources import parquet

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    mine = tmp_path / "dvl-batch-node_a-999999999-x.parquet"  # a pid no Linux hands out
    theirs = tmp_path / "dvl-batch-node_b-999999999-x.parquet"
    for path in (mine, theirs):
        path.write_bytes(b"x")
    assert parquet.remove_stale_copies(tmp_path) == 1
    assert not mine.exists() and theirs.exists()
