"""Runners: device lists, stats folding, OUT locks shared by ranks, and the real
multi-process, rank and Ray runs end to end (CPU engines, tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dvl_batch.config.launch import decoders_per_engine, parse_device_list
from dvl_batch.errors import EXIT_FAILED, EXIT_INTERRUPTED, LockHeldError, UsageError
from dvl_batch.inspect import collect_status
from dvl_batch.runtime.job import shard_owner
from dvl_batch.runtime.pipeline import RunStats
from dvl_batch.runtime.runners.engines import StatsTally
from dvl_batch.sink.output import OutputDir

from .conftest import IMAGES, cli_env, many_shards, read_rows, run_cli

FAST = ["--model", "tiny", "--max-new-tokens", "8", "--no-progress"]
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID",
                  "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "RAY_ADDRESS")


# ------------------------------------------------------------------ units


def test_device_lists():
    assert parse_device_list("all", visible_gpus=2) == ["cuda:0", "cuda:1"]
    assert parse_device_list("0, 2", visible_gpus=4) == ["cuda:0", "cuda:2"]
    assert parse_device_list("cuda:1,cpu", visible_gpus=2) == ["cuda:1", "cpu"]
    assert parse_device_list("cpu,cpu", visible_gpus=0) == ["cpu", "cpu"]
    for bad, message in [("all", "no CUDA device"), ("0,0", "listed twice"), ("3", r"2 GPU\(s\) are visible"),
                         ("gpu0", "must be 'all'"), ("", "must be 'all'")]:
        with pytest.raises(UsageError, match=message):
            parse_device_list(bad, visible_gpus=0 if bad == "all" else 2)


def test_decoders_are_split_between_engines():
    assert decoders_per_engine(cpus=16, engines=1) == 15
    assert decoders_per_engine(cpus=128, engines=8) == 15
    assert decoders_per_engine(cpus=64, engines=8) == 7
    assert decoders_per_engine(cpus=2, engines=2) == 1  # never zero: engines need a decoder
    assert decoders_per_engine(cpus=256, engines=1) == 16


def test_tally_sums_engines_and_takes_peak_memory_as_max():
    tally = StatsTally()
    tally.update(0, RunStats(shards_written=1, samples=10, engine={"idle_seconds": 1.0, "peak_memory_gib": 30.0}))
    tally.update(1, RunStats(shards_written=2, samples=20, engine={"idle_seconds": 2.0, "peak_memory_gib": 40.0}))
    tally.finish(0, RunStats(shards_written=3, samples=30, engine={"idle_seconds": 1.5, "peak_memory_gib": 31.0}))
    total = tally.total()
    assert (total.shards_written, total.samples) == (5, 50)
    assert total.engine["idle_seconds"] == 3.5 and total.engine["peak_memory_gib"] == 40.0
    tally.forget(1)  # a lost engine's unfinished work is redone, not counted
    assert tally.total().samples == 30


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (None, None)),
        ({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (3, 8)),  # torchrun inside SLURM
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "5",
          "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (2, 5)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (3, 6)),
    ],
)
def test_rank_and_world_size_from_launchers(monkeypatch, env, expected):
    from dvl_batch.config.launch import rank_from_environment

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert rank_from_environment() == expected


HOLD_RANK_LOCK = """
import sys, time
from dvl_batch.sink.output import OutputDir
OutputDir(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])).prepare(owns=lambda shard_id: False)
print("locked", flush=True)
time.sleep(600)
"""


def test_ranks_of_one_world_share_out_and_other_worlds_are_refused(tmp_path, cache_dir):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RANK_LOCK, str(out), "0", "2"], env=cli_env(cache_dir),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        same_world = OutputDir(out, 1, 2)
        same_world.prepare(owns=lambda shard_id: True)
        same_world.release()
        with pytest.raises(LockHeldError, match="another dvl-batch run holds"):
            OutputDir(out, 0, 2).prepare()
        for rank, world in [(0, 1), (0, 3), (2, 3)]:
            with pytest.raises(LockHeldError, match="different --world-size"):
                OutputDir(out, rank, world).prepare()
    finally:
        holder.kill()
        holder.wait()
    single = OutputDir(out)
    single.prepare()  # the holder died: its locks went with it
    single.release()


RANK_STARTS = """
import sys, time
from dvl_batch.sink.output import OutputDir
out = OutputDir(sys.argv[1], int(sys.argv[2]), 6)
time.sleep(float(sys.argv[3]) - time.time())  # all start their checks at the same moment
out.prepare(owns=lambda shard_id: False)
print("ok", flush=True)
time.sleep(1)
"""


def test_ranks_starting_together_never_refuse_each_other(tmp_path, cache_dir):
    start_at = str(time.time() + 3)
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_STARTS, str(tmp_path / "out"), str(r), start_at],
                              env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(6)]
    outputs = [proc.communicate(timeout=60) for proc in ranks]
    assert [o.strip() for o, _ in outputs] == ["ok"] * 6, [e[-300:] for _, e in outputs]


def test_overwrite_with_ranks_is_refused_only_when_there_is_something_to_delete(tmp_path):
    fresh = OutputDir(tmp_path / "fresh", 0, 2)
    fresh.parts.mkdir(parents=True)
    fresh.clear()  # nothing there: --overwrite on a new OUT is harmless
    used = OutputDir(tmp_path / "used", 0, 2)
    used.parts.mkdir(parents=True)
    (used.parts / "a-1.parquet").write_bytes(b"part")
    with pytest.raises(UsageError, match="--overwrite cannot be combined with --world-size"):
        used.clear()
    assert (used.parts / "a-1.parquet").exists()


def test_stale_temp_parts_are_removed_only_for_owned_shards(tmp_path):
    out = OutputDir(tmp_path / "out", 0, 2)
    out.parts.mkdir(parents=True)
    mine, theirs = out.parts / ".a-1.parquet.tmp-111", out.parts / ".b-2.parquet.tmp-222"
    mine.write_bytes(b"half")
    theirs.write_bytes(b"half")
    out.prepare(owns=lambda shard_id: shard_id == "a-1")
    out.release()
    assert not mine.exists() and theirs.exists()


def test_status_counts_the_latest_world_only(tmp_path):
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    (out / "job.json").write_text(json.dumps({"model": "tiny", "spec": {"prompt": {"task": "caption"}}}))
    stale = {"state": "finished", "updated": "2026-01-01T00:00:00", "shards_total": 10}  # an earlier single run
    ranks = [{"state": "running", "updated": f"2026-02-01T00:00:0{r}", "rank": r, "world_size": 2, "shards_total": 4 + r}
             for r in range(2)]
    (out / "progress.json").write_text(json.dumps(stale))
    (out / "progress-rank0of2.json").write_text(json.dumps(ranks[0]))
    report = collect_status(out)
    assert report["world_size"] == 2 and report["ranks_reporting"] == 1 and report["shards_total"] is None
    (out / "progress-rank1of2.json").write_text(json.dumps(ranks[1]))
    report = collect_status(out)
    assert report["ranks_reporting"] == 2 and report["shards_total"] == 9
    assert [r["rank"] for r in report["runs"]] == [0, 1]


# ------------------------------------------------------------------ helpers for real runs


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in cli_env(cache_dir).items() if k not in RANK_VARIABLES}
    env.update(extra)
    return env


def _start(args: list[str], cache_dir: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dvl_batch", *args], env=_env(cache_dir, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _parts(out: Path) -> list[Path]:
    return sorted((out / "parts").glob("*.parquet"))


def _wait_for_parts(out: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(_parts(out)) < count:
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no parts appeared in time"
        time.sleep(0.05)


def _writers(out: Path) -> dict[str, int]:
    """shard id -> pid of the process that wrote its part (from the part's metadata)."""
    found = {}
    for part in _parts(out):
        meta = json.loads(pq.read_schema(part).metadata[b"dvl_batch"])["shard"]
        found[meta["id"]] = int(meta["writer"].rsplit(":", 1)[1])
    return found


def _engines(pid: int, marker: str, busy: bool = False) -> list[int]:
    """Engine processes under `pid` whose command line has `marker` (not the decoders they
    fork, which inherit it); busy: only those with a live decoder, i.e. inside a shard."""
    psutil = pytest.importorskip("psutil")
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            engine = marker in " ".join(child.cmdline()) and marker not in " ".join(child.parent().cmdline())
            if engine and (not busy or any(marker in " ".join(c.cmdline()) for c in child.children())):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def _wait_for_busy_engine(pid: int, marker: str, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while not (busy := _engines(pid, marker, busy=True)):
        assert proc.poll() is None and time.time() < deadline, "no engine was busy"
        time.sleep(0.02)
    return busy[0]


def _assert_rows_exactly_once(out: Path, n_samples: int) -> None:
    rows = read_rows(out).to_pandas()
    assert len(rows) == n_samples and rows["key"].is_unique
    assert rows["error"].isna().all()
    assert not list((out / "parts").glob(".*tmp*"))


# ------------------------------------------------------------------ multi-process runner


@pytest.mark.slow
def test_cpu_engine_processes_share_shards_survive_stops_and_crashes(tmp_path, cache_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    many_shards(data, 12, 2)
    # one decoder per engine, little read-ahead: shards go to engines as they consume them
    args = ["caption", str(data), "-o", str(out), "--gpus", "cpu,cpu", "--workers", "1", "--prefetch", "1",
            "--batch-size", "2", "--prefill-batch", "1", *FAST]

    stopped = _start(args, cache_dir)  # SIGTERM to the parent: engines finish in-flight shards, exit 130
    _wait_for_parts(out, 1, stopped)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == EXIT_INTERRUPTED, err
    assert err.count("dvl-batch summary") == 1
    assert len(_parts(out)) < 12

    crashed = _start(args, cache_dir)  # an engine process dies mid-shard: the other goes on, the run fails
    os.kill(_wait_for_busy_engine(crashed.pid, "spawn_main", crashed), signal.SIGKILL)
    _, err = crashed.communicate(timeout=120)
    assert crashed.returncode == EXIT_FAILED, err
    assert "was killed by SIGKILL" in err and "rerun the same command" in err
    assert not list((out / "parts").glob(".*tmp*"))

    finished = run_cli(args, cache_dir)
    assert finished.returncode == 0, finished.stderr
    assert "Loading weights" not in finished.stderr  # library bars hushed in engine processes too
    # the crashed run may have left nothing to do: then the rerun says so instead of a summary
    assert (finished.stderr.count("dvl-batch summary") == 1 and "12/12 done" in finished.stderr) or (
        "nothing to do: all 12 shards" in finished.stderr
    ), finished.stderr
    _assert_rows_exactly_once(out, 24)
    assert len(set(_writers(out).values())) >= 2  # parts came from several engine processes


# ------------------------------------------------------------------ static ranks


@pytest.mark.slow
def test_concurrent_ranks_write_every_row_once(tmp_path, cache_dir):
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    photos = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
    for i in range(12):
        source = photos[i % len(photos)]
        (folder / f"img{i:02d}{source.suffix}").write_bytes(source.read_bytes())
    args = ["caption", str(folder), "-o", str(out), "--shard-size", "2", "--workers", "0", *FAST]
    launchers = [{"RANK": "0", "WORLD_SIZE": "3"}, {"RANK": "1", "WORLD_SIZE": "3"},
                 {"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}]  # torchrun- and SLURM-style variables
    ranks = [_start(args, cache_dir, **env) for env in launchers]
    results = [proc.communicate(timeout=300) for proc in ranks]
    for proc, (_, err) in zip(ranks, results, strict=True):
        assert proc.returncode == 0, err
    _assert_rows_exactly_once(out, 12)
    rank_of_pid = {proc.pid: rank for rank, proc in enumerate(ranks)}
    writers = _writers(out)
    assert len(writers) == 6
    for shard_id, pid in writers.items():
        assert shard_owner(shard_id, 3) == rank_of_pid[pid], "a shard was written by a rank that does not own it"
    assert len(json.loads((out / "folder_shards.json").read_text())) == 1  # one manifest, one chunking

    status = run_cli(["status", str(out), "--json"], cache_dir)
    report = json.loads(status.stdout)
    assert (report["shards_done"], report["shards_total"], report["rows"]) == (6, 6, 12)
    assert report["world_size"] == 3 and report["ranks_reporting"] == 3
    assert Counter(r["state"] for r in report["runs"]) == {"finished": 3}



# ------------------------------------------------------------------ Ray


@pytest.mark.slow
def test_ray_runner_survives_a_killed_actor(tmp_path, cache_dir):
    pytest.importorskip("ray")
    data, out = tmp_path / "data", tmp_path / "out"
    many_shards(data, 8, 3)
    args = ["caption", str(data), "-o", str(out), "--runner", "ray", "--gpus", "cpu,cpu", "--workers", "1",
            "--model", "tiny", "--max-new-tokens", "16", "--no-progress"]
    proc = _start(args, cache_dir)
    _wait_for_parts(out, 1, proc, timeout=300)
    victim = _wait_for_busy_engine(proc.pid, "ray::EngineActor", proc)
    done_at_kill = len(_parts(out))
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert done_at_kill < 8, "the kill must land before the last shard"
    assert err.count("dvl-batch summary") == 1 and "8/8 done" in err
    _assert_rows_exactly_once(out, 24)
    # the killed actor's shard was redone (8/8 done, every row exactly once, above) either by
    # its restarted process (Ray retries the task) or by the other actor (a chunk whose actor
    # stays dead is handed on): both are designed outcomes, and which one happens depends on
    # when the kill lands; either way both actors' processes wrote parts
    assert len(set(_writers(out).values())) >= 2
    assert run_cli(["status", str(out), "--json"], cache_dir).returncode == 0


def test_ray_runner_reads_gpus_as_one_actor_per_entry(tmp_path, cache_dir):
    pytest.importorskip("ray")
    from dvl_batch.runtime.runners.ray import make_chunks, ray_engine_devices

    assert ray_engine_devices("all", cluster_gpus=4) == ["cuda:0"] * 4
    assert ray_engine_devices("0,1", cluster_gpus=2) == ["cuda:0"] * 2  # Ray places each GPU actor
    assert ray_engine_devices("cpu,cpu,cpu", cluster_gpus=0) == ["cpu"] * 3
    with pytest.raises(UsageError, match="no GPUs"):
        ray_engine_devices(None, cluster_gpus=0)
    with pytest.raises(UsageError, match="--gpus must be"):
        ray_engine_devices("two", cluster_gpus=2)
    assert [len(c.shards) for c in make_chunks(list(range(100)), 2)] == [8] * 12 + [4]
    assert [len(c.shards) for c in make_chunks(list(range(5)), 2)] == [1] * 5


@pytest.mark.slow
def test_verbose_keeps_library_output_in_engine_processes(tmp_path, cache_dir):
    """--verbose reaches the engine processes: their weight-loading bars stay in the log
    (hushed by default, in the parent and in every engine)."""
    many_shards(tmp_path / "data", 2, 1)
    loud = run_cli(["caption", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--gpus", "cpu,cpu", "--workers", "1",
                    "--verbose", *FAST], cache_dir)
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr  # (the default, hushed, is checked in the runner test above)
