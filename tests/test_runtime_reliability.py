"""Reliability end to end: kills at random points, signals, full or read-only disks, two runs
on one OUT. Every test runs the real `dvl-batch` command in subprocesses on real files.

Faults that cannot be produced from outside (a kill *while* a part file is being written,
a disk that fills up between two parts) are injected by tests/support/sitecustomize.py,
which the subprocess loads from its PYTHONPATH; the product code has no test hooks.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED

from .cli_processes import Run, fault_env, holds_lock, wait_until
from .conftest import example_images, read_rows, write_image_shard
from .hostile_files import solid_png

QUESTIONS = ["What is this?", "Is it outdoors?"]
SHARD_SIZES = [1, 2, 1, 2, 1]  # 7 samples x 2 questions = 14 rows per complete run
# the random-kill chains: enough shards that a signalled run seldom finds just one left to do
KILL_SHARD_SIZES = [1, 2, 1, 2, 1, 2, 1, 2]


# ---------------------------------------------------------------- helpers


def write_dataset(folder: Path, sizes: list[int] = SHARD_SIZES) -> dict[str, list[str]]:
    """Webdataset shards with unique keys; returns {shard file stem: [keys]}."""
    photos = list(example_images().values())
    layout: dict[str, list[str]] = {}
    n = 0
    for s, size in enumerate(sizes):
        keys = [f"s{s}_{i}" for i in range(size)]
        write_image_shard(folder / f"shard-{s:02d}.tar", {k: photos[(n + i) % len(photos)] for i, k in enumerate(keys)})
        layout[f"shard-{s:02d}"] = keys
        n += size
    return layout


def vqa_args(data: Path, out: Path, workers: int = 1) -> list[str]:
    """One sample (two questions) at a time, so parts appear one by one, not in one burst at the end."""
    args = ["vqa", str(data), "-o", str(out), "--model", "tiny", "--max-new-tokens", "4", "--workers", str(workers),
            "--batch-size", "2"]
    for q in QUESTIONS:
        args += ["-q", q]
    return [*args, "--no-progress"]


def check_parts(out: Path, layout: dict[str, list[str]], complete: bool) -> set[str]:
    """Every part reads with pyarrow and holds exactly one row per (sample, question) of
    its shard; with `complete`, every shard has its part. Returns the finished shards."""
    parts = sorted((out / "parts").glob("*.parquet"))
    seen: set[tuple[str, int]] = set()
    finished = set()
    for part in parts:
        table = pq.read_table(part)  # raises on a torn or corrupt file
        shard_file = part.stem.rsplit("-", 1)[0]
        expected = {(key, q) for key in layout[shard_file] for q in range(len(QUESTIONS))}
        rows = list(zip(table["key"].to_pylist(), table["question_index"].to_pylist(), strict=True))
        assert len(rows) == len(set(rows)) and set(rows) == expected, f"{part.name}: {sorted(rows)}"
        assert not seen & set(rows), f"rows of {part.name} also appear in another part"
        seen |= set(rows)
        assert all(table["error"].is_null().to_pylist()), part.name
        info = json.loads(pq.read_schema(part).metadata[b"dvl_batch"])["shard"]
        assert info["partial"] is False and info["rows"] == len(expected)
        finished.add(shard_file)
    if complete:
        assert finished == set(layout), f"missing parts: {set(layout) - finished}"
        assert not list((out / "parts").glob(".*tmp*")), "stale temporary part files"
    return finished


# ---------------------------------------------------------------- crash trials


@dataclass
class Trial:
    """One signal (or two) sent to one run at one kind of moment."""

    number: int
    signal: signal.Signals
    when: str  # "startup": model loading/decoding; "parts": among part writes; "in-write": inside one
    delay: float = 0.0  # seconds after the moment's start ("in-write": which part write, 0-based)
    repeat: int = 1  # 2 = a second SIGTERM while the first is being honoured ("abort now")
    workers: int = 1
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"trial {self.number}: {self.signal.name} x{self.repeat} {self.when} +{self.delay:.2f} workers={self.workers}"

    @property
    def faults(self) -> dict:
        """A slow disk for "parts" (kills land between and inside part writes), a pause for "in-write"."""
        return {"in-write": {"pause_part_write": 0.4}, "parts": {"pause_part_write": 0.2}}.get(self.when, {})


MOMENTS = ("startup", "parts", "in-write")


def trial_plan(seed: int = 4) -> list[Trial]:
    """12 trials: every signal at a random moment of start-up, of part writing and inside a write,
    each moment (and each signal) with and without decoder processes, SIGKILL twice more, and a
    second SIGTERM while the first is honoured."""
    rng = random.Random(seed)
    workers_at = {  # (decoder processes) for each moment of each signal
        signal.SIGKILL: {"startup": (0, 1), "parts": (1, 0), "in-write": (1,)},
        signal.SIGTERM: {"startup": (1,), "parts": (0,), "in-write": (1,)},
        signal.SIGINT: {"startup": (1,), "parts": (1,), "in-write": (0,)},
    }
    trials = []
    for sig, moments in workers_at.items():
        for when, workers in moments.items():
            for n in workers:
                delay = {"startup": rng.uniform(0, 2.0), "parts": rng.uniform(0, 1.2)}.get(when, rng.randint(0, 1))
                trials.append(Trial(0, sig, when, delay, workers=n))
    trials.append(Trial(0, signal.SIGTERM, "in-write", 0, repeat=2))
    rng.shuffle(trials)
    for number, trial in enumerate(trials):
        trial.number = number
    return trials


def signal_run(trial: Trial, data: Path, out: Path, layout: dict[str, list[str]], cache_dir: Path) -> set[str]:
    """Start a run on `out`, signal it at the trial's moment, check what it left. Returns finished shards."""
    run = Run(vqa_args(data, out, trial.workers), fault_env(cache_dir, trial.faults))
    temp_part = None
    if trial.when == "startup":
        assert wait_until(lambda: holds_lock(out, run.proc.pid), 120, run.proc), f"{trial}: never started\n{run.stderr}"
        time.sleep(trial.delay)
    else:
        target = int(trial.delay) + 1 if trial.when == "in-write" else 1
        seen = wait_until(lambda: len(run.lines_with("part half-written")) >= target, 120, run.proc)
        assert seen or run.proc.poll() == 0, f"{trial}: no part write seen\n{run.stderr}"
        if trial.when == "parts":
            time.sleep(trial.delay)
        elif seen:
            temp_part = Path(run.lines_with("part half-written")[target - 1].split("part half-written ", 1)[1].strip())
            assert temp_part.exists(), f"{trial}: the part's temporary file should exist mid-write"
    finished_before_signal = run.proc.poll() is not None
    for i in range(trial.repeat):
        if run.proc.poll() is None:
            run.proc.send_signal(trial.signal)
        if i + 1 < trial.repeat:
            assert run.wait_for_line("received", 30), f"{trial}: first signal not acknowledged\n{run.stderr}"
    code = run.wait()
    if code == 0 or finished_before_signal:  # nothing (left) to do, or done before the signal landed
        assert code == 0 and "dvl-batch summary" in run.stderr and "interrupted:" not in run.stderr, run.stderr
        trial.notes.append("finished before the signal")
    elif trial.signal == signal.SIGKILL:
        assert code == -signal.SIGKILL, f"{trial}: {code}"
    else:
        assert code == EXIT_INTERRUPTED, f"{trial}: exit {code}\n{run.stderr}"
        assert "interrupted:" in run.stderr or "aborted" in run.stderr, f"{trial}: no clear message\n{run.stderr}"
        assert "Traceback" not in run.stderr, f"{trial}\n{run.stderr}"
    finished = check_parts(out, layout, complete=False)
    if temp_part is not None and not finished_before_signal:
        shard_file = temp_part.name[1:].split(".parquet.tmp-")[0].rsplit("-", 1)[0]
        if trial.signal == signal.SIGKILL:
            assert temp_part.exists() and shard_file not in finished, f"{trial}: SIGKILL mid-write leaves only the temp file"
        elif trial.repeat == 1:
            assert shard_file in finished and not temp_part.exists(), f"{trial}: the part being written must be finished"
        else:
            assert shard_file not in finished and not temp_part.exists(), f"{trial}: abort mid-write leaves no trace"
    trial.notes.append(f"exit {code}, {len(finished)}/{len(layout)} parts")
    return finished


def resume_to_completion(data: Path, out: Path, layout: dict[str, list[str]], cache_dir: Path) -> None:
    resumed = subprocess.run(
        [sys.executable, "-m", "dvl_batch", *vqa_args(data, out)], env=fault_env(cache_dir), capture_output=True,
        text=True, timeout=300,
    )
    assert resumed.returncode == 0, f"resume of {out.name} failed\n{resumed.stderr}"
    check_parts(out, layout, complete=True)


def run_lane(trials: queue.Queue, lane: int, data: Path, layout: dict[str, list[str]], root: Path, cache_dir: Path,
             max_kills: int = 5) -> list[Trial]:
    """Take trials until none are left. Each signalled run is resumed by the lane's next run on the
    same OUT; after at most `max_kills` signals a run to completion must give exactly one row per
    (sample, question), and the next trial starts on a fresh OUT."""
    done: list[Trial] = []
    chain, kills = 0, 0
    while True:
        try:
            trial = trials.get_nowait()
        except queue.Empty:
            break
        out = root / f"lane{lane}-chain{chain}"
        finished = signal_run(trial, data, out, layout, cache_dir)
        trial.notes.append(f"{out.name}, signal {kills + 1} of the chain")
        done.append(trial)
        kills += 1
        if finished == set(layout):  # a graceful stop finished everything in flight: nothing to resume
            check_parts(out, layout, complete=True)
            chain, kills = chain + 1, 0
        elif kills == max_kills or trials.empty():
            resume_to_completion(data, out, layout, cache_dir)
            chain, kills = chain + 1, 0
    return done


@pytest.mark.slow
def test_random_kills_then_resume_give_exactly_one_row_per_sample_and_question(tmp_path, cache_dir, tiny_model_dir):
    data = tmp_path / "data"
    layout = write_dataset(data, KILL_SHARD_SIZES)
    plan = trial_plan()
    signals = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
    assert {(t.signal, t.when) for t in plan} == {(sig, when) for sig in signals for when in MOMENTS}
    assert {(t.when, t.workers) for t in plan} == {(when, n) for when in MOMENTS for n in (0, 1)}
    assert {(t.signal, t.workers) for t in plan} == {(sig, n) for sig in signals for n in (0, 1)}
    assert any(t.repeat == 2 for t in plan)
    pending: queue.Queue = queue.Queue()
    for trial in plan:
        pending.put(trial)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        lanes = [pool.submit(run_lane, pending, lane, data, layout, tmp_path, cache_dir) for lane in range(2)]
        done = [trial for lane in lanes for trial in lane.result()]
    assert sorted(t.number for t in done) == list(range(len(plan)))
    print(f"{len(done)} trials in {time.monotonic() - started:.0f} s")
    for trial in sorted(done, key=lambda t: t.number):
        print(trial, "|", "; ".join(trial.notes))


# ---------------------------------------------------------------- full or read-only disk


def test_disk_full_between_parts_fails_cleanly_and_resumes(tmp_path, cache_dir, tiny_model_dir):
    """ENOSPC half-way through the third part's temporary file (EROFS: test_sink_parts_and_output, and the real tmpfs below)."""
    data = tmp_path / "data"
    layout = write_dataset(data)
    out = tmp_path / "out"
    failing = subprocess.run(
        [sys.executable, "-m", "dvl_batch", *vqa_args(data, out)],
        env=fault_env(cache_dir, {"fail_part_write": "ENOSPC", "after_parts": 2}), capture_output=True, text=True,
        timeout=300,
    )
    assert failing.returncode == EXIT_FAILED, failing.stderr
    assert "failing part write" in failing.stderr  # the injected fault really fired
    errors = [line for line in failing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and "Traceback" not in failing.stderr, failing.stderr
    assert "free space and rerun to resume" in errors[0]
    assert len(check_parts(out, layout, complete=False)) == 2
    assert not list((out / "parts").glob(".*tmp*")), "the half-written part must be removed"
    resumed = subprocess.run(
        [sys.executable, "-m", "dvl_batch", *vqa_args(data, out)], env=fault_env(cache_dir), capture_output=True,
        text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    check_parts(out, layout, complete=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB tmpfs (needs mount rights, e.g. root in a container); skipped elsewhere."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_disk(path: Path) -> None:
    """Write zeros until the filesystem holding `path` is full."""
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass


@pytest.mark.slow
def test_real_full_tmpfs_fails_cleanly_and_resumes_after_space_is_freed(tmp_path, cache_dir, tiny_model_dir, small_tmpfs):
    data = tmp_path / "data"
    layout = write_dataset(data)
    out = small_tmpfs / "out"
    run = Run(vqa_args(data, out), fault_env(cache_dir))
    assert wait_until(lambda: len(list((out / "parts").glob("*.parquet"))) >= 1, 120, run.proc), run.stderr
    fill_disk(small_tmpfs / "filler")
    code = run.wait()
    if code == 0:
        pytest.skip("the run finished before the disk filled up")
    assert code == EXIT_FAILED, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and "Traceback" not in run.stderr, run.stderr
    finished = check_parts(out, layout, complete=False)
    assert 1 <= len(finished) < len(layout)
    assert not list((out / "parts").glob(".*tmp*"))
    (small_tmpfs / "filler").unlink()
    resumed = subprocess.run(
        [sys.executable, "-m", "dvl_batch", *vqa_args(data, out)], env=fault_env(cache_dir), capture_output=True,
        text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    check_parts(out, layout, complete=True)


@pytest.mark.slow
def test_real_read_only_output_fails_cleanly_then_resumes(tmp_path, cache_dir, tiny_model_dir, small_tmpfs):
    data = tmp_path / "data"
    layout = write_dataset(data, [1, 2])
    out = small_tmpfs / "out"
    out.mkdir()
    remount = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True)
    if remount.returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    try:
        failing = subprocess.run([sys.executable, "-m", "dvl_batch", *vqa_args(data, out)], env=fault_env(cache_dir),
                                 capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], capture_output=True)
    assert failing.returncode == EXIT_FAILED, failing.stderr
    errors = [line for line in failing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Read-only file system" in errors[0] and "Traceback" not in failing.stderr
    resumed = subprocess.run([sys.executable, "-m", "dvl_batch", *vqa_args(data, out)], env=fault_env(cache_dir),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    check_parts(out, layout, complete=True)


# ---------------------------------------------------------------- two runs on one OUT


@pytest.mark.slow
def test_second_run_on_same_output_exits_at_once_and_a_killed_runs_lock_is_no_obstacle(tmp_path, cache_dir, tiny_model_dir):
    data = tmp_path / "data"
    layout = write_dataset(data)
    out = tmp_path / "out"
    first = Run(vqa_args(data, out), fault_env(cache_dir, {"pause_part_write": 1.0}))  # slow parts keep it busy
    try:
        assert wait_until(lambda: holds_lock(out, first.proc.pid), 120, first.proc), first.stderr
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "dvl_batch", *vqa_args(data, out)], env=fault_env(cache_dir), capture_output=True,
            text=True, timeout=120,
        )
        assert second.returncode == EXIT_LOCKED, second.stderr
        assert first.proc.poll() is None, "the second run must not wait for the first"
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "another dvl-batch run holds" in errors[0], second.stderr
        assert f"pid {first.proc.pid}" in second.stderr.replace("\n", " ")
        print(f"second run refused in {time.monotonic() - started:.1f} s")
        first.wait_for_line("part half-written", 120)
    finally:
        first.proc.kill()
        first.wait()
    assert f"pid {first.proc.pid} " in (out / ".lock").read_text(), "the killed run's lock file stays behind"
    third = subprocess.run(
        [sys.executable, "-m", "dvl_batch", *vqa_args(data, out)], env=fault_env(cache_dir), capture_output=True,
        text=True, timeout=300,
    )
    assert third.returncode == 0, third.stderr
    check_parts(out, layout, complete=True)


# ---------------------------------------------------------------- out of memory on the device


def simulated_oom(what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({what}, simulated by the test)")


def is_poison(pixels: torch.Tensor) -> bool:
    """The all-black image: the device "runs out of memory" for it even alone."""
    return any(float(image.float().std()) == 0.0 for image in pixels)


class OomAboveOneImage(VisionLanguageModel):
    """transformers' modules as usual, but encoding more than one image at once (or the black one)
    raises torch.OutOfMemoryError, as a GPU that is nearly full would."""

    def image_features(self, pixels, **vision_kwargs):
        first = next(iter(pixels.values()))
        if first.shape[0] > 1 or is_poison(first):
            raise simulated_oom(f"{first.shape[0]} images")
        return super().image_features(pixels, **vision_kwargs)


def oom_above_one_prompt(model):
    real_generate = model.generate

    def generate(**kwargs):
        if kwargs["input_ids"].shape[0] > 1 or is_poison(kwargs["pixel_values"]):
            raise simulated_oom(f"batch of {kwargs['input_ids'].shape[0]}")
        return real_generate(**kwargs)

    model.generate = generate
    return model


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_out_of_memory_batches_are_split_and_the_job_goes_on(tmp_path, cache_dir, tiny_model_dir, monkeypatch, capsys,
                                                              engine):
    from dvl_batch import cli
    from dvl_batch.runtime import worker

    if engine == "continuous":
        monkeypatch.setattr(worker, "VisionLanguageModel", OomAboveOneImage)
    else:
        real_load = worker.load_model
        monkeypatch.setattr(worker, "load_model", lambda *a, **k: oom_above_one_prompt(real_load(*a, **k)))
    photos = example_images()
    photos["black"] = solid_png(64, 64, (0, 0, 0))
    write_image_shard(tmp_path / "data" / "photos.tar", photos)
    out = tmp_path / "out"
    code = cli.app(["caption", str(tmp_path / "data"), "-o", str(out), "--model", "tiny", "--engine", engine,
                    "--batch-size", "4", "--max-new-tokens", "3", "--workers", "0", "--no-progress"],
                   standalone_mode=False)
    stderr = capsys.readouterr().err
    assert code in (None, 0), stderr
    rows = read_rows(out).to_pandas().set_index("key")
    assert len(rows) == len(photos) == 7
    good = rows.drop(index="black")
    assert good["error"].isna().all() and good["answer"].notna().all()
    assert "out of memory on the device" in rows.loc["black", "error"]
    retries = [line for line in stderr.splitlines() if "out-of-memory retries" in line]
    assert len(retries) == 1 and int(retries[0].split()[-2]) >= 3, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_summary_leaves_a_finished_run_successful(tmp_path, cache_dir, tiny_model_dir, sig):
    """Supervisors send SIGTERM (and people press Ctrl-C) to processes already on their way out:
    once the job has ended and printed its summary, the exit status stays 0 (it was -15 / -2 when
    the signal landed in the interpreter's 1-1.5 s teardown of torch, 130 during the summary)."""
    data = tmp_path / "data"
    layout = write_dataset(data, [1, 1])
    out = tmp_path / "out"
    run = Run(vqa_args(data, out), fault_env(cache_dir))
    assert run.wait_for_line("dvl-batch summary", 180), run.stderr
    run.proc.send_signal(sig)
    assert run.wait() == 0, run.stderr
    assert "aborted" not in run.stderr and "Traceback" not in run.stderr
    check_parts(out, layout, complete=True)
