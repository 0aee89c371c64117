"""Checkpoints inside a shard: a kill loses at most one checkpoint interval, a stop loses nothing.

Real `dvl-batch` subprocesses over one large shard of tiny images; the number of answers
each run made is counted from outside (tests/support/sitecustomize.py's "log_answers"),
so answers given twice (by a killed run and again by its resume) are measured, not assumed.
"""

from __future__ import annotations

import io
import json
import random
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dvl_batch.errors import EXIT_INTERRUPTED
from dvl_batch.inspect import collect_status

from .cli_processes import Run, fault_env, wait_until
from .conftest import write_tar

INTERVAL = 0.5  # --checkpoint-seconds of the kill test
KILLS = 5  # SIGKILLs of the kill test, one in each fifth of KILL_WINDOW
KILL_WINDOW = 3.0  # seconds after a run's first new checkpoint file: six checkpoint intervals


def write_big_shard(path: Path, n: int) -> list[str]:
    members = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(buffer, "PNG")
        members.append((f"k{i:05d}.png", buffer.getvalue()))
    write_tar(path, members)
    return [name.split(".")[0] for name, _ in members]


def caption_args(data: Path, out: Path, checkpoint_seconds: float) -> list[str]:
    return ["caption", str(data), "-o", str(out), "--model", "tiny", "--max-new-tokens", "1", "--workers", "1",
            "--checkpoint-seconds", str(checkpoint_seconds), "--no-progress"]


def checkpoint_files(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("*.jsonl"))


def checkpoint_keys(out: Path) -> list[str]:
    records = [json.loads(line) for path in checkpoint_files(out) for line in path.read_text().splitlines()]
    return [r["key"] for r in records if "key" in r]  # each file's first line is its header (whose rows these are)


def answer_times(log: Path) -> list[float]:
    return [float(line) for line in log.read_text().split()] if log.exists() else []


def finish(data: Path, out: Path, keys: list[str], cache_dir: Path, log: Path, checkpoint_seconds: float) -> int:
    """Resume to completion; checks exactly one row per sample in the one part; returns its answers."""
    run = Run(caption_args(data, out, checkpoint_seconds), fault_env(cache_dir, {"log_answers": str(log)}))
    assert run.wait(300) == 0, run.stderr
    parts = sorted((out / "parts").glob("*.parquet"))
    assert len(parts) == 1, parts
    rows = pq.read_table(parts[0])["key"].to_pylist()
    assert sorted(rows) == keys, f"{len(rows)} rows, {len(set(rows))} distinct, {len(keys)} samples"
    assert not checkpoint_files(out), "checkpoints must be folded into the part and removed"
    return len(answer_times(log))


@pytest.mark.slow
def test_sigkill_at_random_points_loses_at_most_one_checkpoint_interval_per_kill(tmp_path, cache_dir, tiny_model_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    keys = write_big_shard(data / "big.tar", 1500)  # about twice what KILLS runs answer before their kill
    rng = random.Random(9)
    # a random moment in each fifth of the window, in random order: kills right after a checkpoint,
    # between two, and several intervals on are all covered (not left to chance)
    delays = [rng.uniform(i, i + 1) * KILL_WINDOW / KILLS for i in range(KILLS)]
    rng.shuffle(delays)
    kills: list[dict] = []
    status_checked = 0
    while len(kills) < KILLS:
        log = tmp_path / f"answers-{len(kills)}.log"
        before = {p.name for p in checkpoint_files(out)}
        saved_before = len(checkpoint_keys(out))
        run = Run(caption_args(data, out, INTERVAL), fault_env(cache_dir, {"log_answers": str(log)}))
        assert wait_until(lambda before=before: any(p.name not in before for p in checkpoint_files(out)), 120, run.proc), run.stderr
        time.sleep(delays[len(kills)])
        live = collect_status(out)["runs"]
        run.proc.kill()
        killed_at = time.time()
        assert run.wait() == -signal.SIGKILL, run.stderr
        if live and live[0]["state"] == "running":  # `status` tells the killed run from a live one
            assert live[0]["alive"] is True
            report = collect_status(out)
            assert report["runs"][0]["state"].startswith("not running") and not report["runs"][0]["alive"], report
            assert report["checkpoint_rows"] == len(checkpoint_keys(out))
            status_checked += 1
        assert not list((out / "parts").glob("*.parquet")), "the shard must not finish before the last kill"
        saved = checkpoint_keys(out)
        assert len(saved) == len(set(saved)), "a sample saved twice"
        times = answer_times(log)
        kills.append({
            "answered": len(times),
            "lost": len(times) - (len(saved) - saved_before),  # answered but not saved: answered again later
            "interval_worth": sum(t > killed_at - INTERVAL - 0.15 for t in times),  # answers in the last interval
            "delay": round(delays[len(kills)], 2),
        })
    assert status_checked >= 1
    final = finish(data, out, keys, cache_dir, tmp_path / "answers-final.log", INTERVAL)
    total = sum(k["answered"] for k in kills) + final
    twice = total - len(keys)
    print(f"{len(kills)} kills: {kills}; final run {final} answers; {twice} samples answered twice")
    assert twice == sum(k["lost"] for k in kills)
    for number, kill in enumerate(kills):
        assert kill["lost"] <= kill["interval_worth"], f"kill {number}: {kill}"


@pytest.mark.slow
def test_sigint_saves_every_answer_then_the_resume_answers_the_rest_once(tmp_path, cache_dir, tiny_model_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    keys = write_big_shard(data / "one.tar", 400)
    log = tmp_path / "answers-stopped.log"
    run = Run(caption_args(data, out, 600), fault_env(cache_dir, {"log_answers": str(log)}))
    assert wait_until(lambda: len(answer_times(log)) >= 50, 120, run.proc), run.stderr
    answered_at_signal = len(answer_times(log))
    run.proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    assert run.wait() == EXIT_INTERRUPTED, run.stderr
    print(f"stopped {time.monotonic() - stopped:.1f} s after SIGINT")
    assert "Traceback" not in run.stderr and "interrupted" in run.stderr, run.stderr
    saved = checkpoint_keys(out)
    answered = len(answer_times(log))
    assert len(saved) == len(set(saved)) == answered >= answered_at_signal >= 50, (len(saved), answered)
    assert f"{answered} rows saved this run" in run.stderr.replace("\n", " "), run.stderr
    resumed = finish(data, out, keys, cache_dir, tmp_path / "answers-resumed.log", 600)
    assert answered + resumed == len(keys), "every sample answered exactly once over both runs"
