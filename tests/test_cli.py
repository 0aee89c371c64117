"""End-to-end: the real `dvl-batch` command on real files, in subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dvl_batch.errors import EXIT_LOCKED, EXIT_USAGE

from .cli_processes import Overlapped
from .conftest import EXAMPLES, cli_env, job_json, many_shards, read_rows, run_cli, start_cli, write_tar

FAST = ["--max-new-tokens", "6", "--workers", "1", "--no-progress"]
EXAMPLE_KEYS = {"astronaut", "camera", "chelsea", "coffee", "logo", "rocket"}


def test_help_lists_commands(cache_dir):
    result = run_cli(["--help"], cache_dir)
    assert result.returncode == 0
    for command in ("caption", "vqa", "status", "inspect"):
        assert command in result.stdout


LAYOUTS = ["shards", "parquet", "images"]


def corrupt_shard(folder: Path) -> Path:
    good = (EXAMPLES / "images" / "chelsea.jpg").read_bytes()
    return write_tar(
        folder / "bad.tar",
        [("ok.jpg", good), ("empty.jpg", b""), ("text.jpg", b"hello, not an image"),
         ("cut.jpg", good[: len(good) // 3]), ("noimage.txt", b"caption only")],
    )


@pytest.fixture(scope="module")
def started(tmp_path_factory, cache_dir, tiny_model_dir):
    """The runs of this module whose OUT the tests only read (and `status` reads one): `caption`
    of each example layout, the vqa run and the corrupt-members run, each into its own OUT, started
    together (two at a time) on first use instead of one per test, one after another."""
    folders = {name: tmp_path_factory.mktemp(f"run-{name}") for name in [*LAYOUTS, "vqa", "corrupt"]}
    outs = {name: folder / "out" for name, folder in folders.items()}
    args = {source: ["caption", str(EXAMPLES / source), "-o", str(outs[source]), *FAST] for source in LAYOUTS}
    args["vqa"] = ["vqa", str(EXAMPLES / "shards"), "-o", str(outs["vqa"]), "-q", "What is this?", "--questions-file",
                   str(EXAMPLES / "questions.jsonl"), "--question-field", "txt", *FAST]
    args["corrupt"] = ["caption", str(corrupt_shard(folders["corrupt"])), "-o", str(outs["corrupt"]), *FAST]
    runs = Overlapped({name: ([sys.executable, "-m", "dvl_batch", *a], cli_env(cache_dir), 300) for name, a in args.items()})
    yield lambda name: (runs.result(name), outs[name])
    runs.close()


@pytest.mark.parametrize("source", LAYOUTS)
def test_caption_examples_every_layout(started, source):
    result, out = started(source)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out).to_pandas()
    keys = {Path(k).stem for k in rows["key"]}
    assert keys == EXAMPLE_KEYS and len(rows) == 6
    assert rows["error"].isna().all()
    assert (rows["question"] == "Describe this image.").all()
    assert set(rows["finish_reason"]) <= {"stop", "length"}
    assert (rows["generated_tokens"] >= 1).all() and (rows["generated_tokens"] <= 6).all()
    assert (rows["prompt_tokens"] > 576).all()
    assert "tiny" in job_json(out)["model"]


def test_outputs_load_with_pandas_and_datasets(started):
    result, out = started("shards")
    assert result.returncode == 0, result.stderr
    part = next((out / "parts").glob("*.parquet"))
    frame = pd.read_parquet(part)
    assert list(frame.columns)[:10] == [
        "key", "shard", "sample_index", "question_index", "question", "answer",
        "prompt_tokens", "generated_tokens", "finish_reason", "error",
    ]
    metadata = json.loads(pq.read_schema(part).metadata[b"dvl_batch"])
    assert metadata["job"]["generation"]["max_new_tokens"] == 6
    assert metadata["shard"]["samples"] == 6 and metadata["shard"]["partial"] is False
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_files=str(out / "parts" / "*.parquet"), split="train")
    assert loaded.num_rows == 6 and "answer" in loaded.column_names


def test_vqa_questions_from_flag_file_and_field(started):
    result, out = started("vqa")
    assert result.returncode == 0, result.stderr
    rows = read_rows(out).to_pandas()
    per_key = Counter(rows["key"])
    assert set(per_key.values()) == {4}  # 1 flag + 2 from the file + 1 from the txt field
    chelsea = rows[rows["key"] == "chelsea"].sort_values("question_index")["question"].tolist()
    assert chelsea == ["What is this?", "What animal is this?", "Describe this image in one sentence.", "What animal is this?"]


def test_status_and_inspect(started, cache_dir):
    result, out = started("parquet")
    assert result.returncode == 0, result.stderr
    status = run_cli(["status", str(out), "--json"], cache_dir)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["shards_done"] == 1 and report["rows"] == 6 and report["error_rows"] == 0
    assert report["runs"][0]["state"] == "finished"
    inspect = run_cli(["inspect", str(EXAMPLES / "shards"), "--json"], cache_dir)
    assert inspect.returncode == 0, inspect.stderr
    found = json.loads(inspect.stdout)
    assert found["samples"] == 6
    assert set(found["details"][0]["fields"]) == {"jpg", "png", "txt", "json"}


def test_rerun_resumes_without_duplicates_and_refuses_other_settings(tmp_path, cache_dir):
    data = tmp_path / "data"
    many_shards(data, 3, 2)
    out = tmp_path / "out"
    first = run_cli(["caption", str(data), "-o", str(out), *FAST], cache_dir)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}
    many_shards(data, 4, 2)  # a cron run later finds one more shard
    second = run_cli(["caption", str(data), "-o", str(out), *FAST], cache_dir)
    assert second.returncode == 0, second.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}
    assert len(after) == 4 and all(after[name] == mtime for name, mtime in before.items())
    rows = read_rows(out).to_pandas()
    assert len(rows) == 8 and rows["key"].is_unique
    other = run_cli(["caption", str(data), "-o", str(out), "--prompt", "Say something.", *FAST], cache_dir)
    assert other.returncode == EXIT_USAGE
    assert "different job" in other.stderr and "--overwrite" in other.stderr
    assert 'prompt.prompt "Describe this image." -> "Say something."' in other.stderr
    assert "prompt.questions" not in other.stderr  # only the setting that changed is named
    redo = run_cli(["caption", str(data), "-o", str(out), "--prompt", "Say something.", "--overwrite", *FAST], cache_dir)
    assert redo.returncode == 0, redo.stderr
    assert set(read_rows(out).to_pandas()["question"]) == {"Say something."}


def test_corrupt_members_become_error_rows(started):
    result, out = started("corrupt")
    assert result.returncode == 0, result.stderr
    rows = read_rows(out).to_pandas().set_index("key")
    assert pd.isna(rows.loc["ok", "error"]) and rows.loc["ok", "answer"]
    assert "empty" in rows.loc["empty", "error"]
    assert "not an image" in rows.loc["text", "error"]
    assert "truncated" in rows.loc["cut", "error"]
    assert "fields found: txt" in rows.loc["noimage", "error"]
    assert (rows.drop(index="ok")["finish_reason"] == "error").all()


def test_bad_configuration_exits_2_with_one_line(tmp_path, cache_dir):
    cases = [
        ["caption", str(EXAMPLES / "shards"), "-o", str(tmp_path / "a"), "--batch-size", "-3"],
        ["caption", str(tmp_path / "missing"), "-o", str(tmp_path / "b")],
        ["vqa", str(EXAMPLES / "shards"), "-o", str(tmp_path / "c")],
    ]
    for args in cases:
        result = run_cli(args, cache_dir)
        assert result.returncode == EXIT_USAGE, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("error:")


def test_second_concurrent_run_exits_with_lock_code(tmp_path, cache_dir):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=cli_env(cache_dir), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run_cli(["caption", str(EXAMPLES / "shards"), "-o", str(out), *FAST], cache_dir)
        assert second.returncode == EXIT_LOCKED, second.stderr
        assert "another dvl-batch run holds" in second.stderr and f"pid {holder.pid}" in second.stderr
        assert not list((out / "parts").glob("*.parquet"))
    finally:
        holder.kill()
        holder.wait()
    after_holder_died = run_cli(["caption", str(EXAMPLES / "shards"), "-o", str(out), *FAST], cache_dir)
    assert after_holder_died.returncode == 0, after_holder_died.stderr


HOLD_LOCK = """
import sys, time
from dvl_batch.sink.output import OutputDir
out = OutputDir(sys.argv[1])
out.prepare()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_exactly_one_row_per_sample(tmp_path, cache_dir):
    data = tmp_path / "data"
    many_shards(data, 8, 3)
    out = tmp_path / "out"
    args = ["caption", str(data), "-o", str(out), "--max-new-tokens", "16", "--workers", "1", "--no-progress"]
    proc = start_cli(args, cache_dir)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((out / "parts").glob("*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(list((out / "parts").glob("*.parquet")))
    assert 2 <= done_before < 8, "the kill must land mid-job"
    resumed = run_cli(args, cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(out).to_pandas()
    assert len(rows) == 24 and rows["key"].is_unique
    assert not list((out / "parts").glob(".*tmp*"))
