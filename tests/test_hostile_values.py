"""Hostile values a crash hunt found: each gives error rows or one clear usage error, quickly
and in bounded memory, never a traceback or the rest of a shard lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from dvl_batch.config.spec import JobSpec
from dvl_batch.errors import UsageError
from dvl_batch.inspect import collect_status
from dvl_batch.preprocess.prompts import load_questions_file
from dvl_batch.records import RawSample, ShardEnd
from dvl_batch.sources import discover_shards, read_shard

from .conftest import cli_env, image_bytes, read_rows, write_parquet, write_tar


def test_a_brace_pattern_of_millions_of_names_is_refused_before_it_is_expanded():
    started = time.monotonic()
    with pytest.raises(UsageError, match="expands to more than 1,000,000 names"):
        discover_shards(["nope/{0..30000000}.tar"], 100)
    with pytest.raises(UsageError, match="expands to more than"):
        discover_shards(["nope/" + "{a,b}" * 40 + ".tar"], 100)  # 2**40 names
    assert time.monotonic() - started < 10


def test_many_members_of_one_key_are_bounded_per_sample(tmp_path):
    """A tar whose members all share one key (a tiny .tgz of zeros can hold thousands) keeps at
    most 4x the per-file cap for that sample; the rest are skipped and named in its error."""
    shard = write_tar(tmp_path / "same.tar", [(f"a.{i}.bin", b"\0" * 90_000) for i in range(12)]
                      + [("b.jpg", image_bytes("coffee.jpg"))])
    (listed,) = discover_shards([str(shard)], 100)
    items = list(read_shard(listed, max_bytes=100_000))
    samples = [i for i in items if isinstance(i, RawSample)]
    assert [s.key for s in samples] == ["a", "b"] and isinstance(items[-1], ShardEnd)
    assert samples[0].error.count("past 4x the per-file cap") == 1 and samples[1].error is None
    assert len(samples[0].fields) <= 4  # (what was kept of the 12 members)


def test_a_bad_cell_in_a_parquet_path_column_is_that_rows_error_only(tmp_path):
    folder = tmp_path / "data"
    (folder / "ok.jpg").parent.mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(image_bytes("coffee.jpg"))
    path = write_parquet(folder / "t.parquet", {"key": [f"r{i}" for i in range(5)],
                                                "path": ["ok.jpg", "ok.jpg", "bad\0name.jpg", "ok.jpg", "ok.jpg"]})
    (listed,) = discover_shards([str(path)], 100)
    items = list(read_shard(listed))
    samples = [i for i in items if isinstance(i, RawSample)]
    assert [s.key for s in samples] == [f"r{i}" for i in range(5)]
    assert [s.error is None for s in samples] == [True, True, False, True, True]
    assert "cannot read image" in samples[2].error and not items[-1].partial


def test_a_recipe_value_that_expands_to_millions_of_items_gives_a_short_error():
    """YAML anchors nested 9 deep stand for 9**9 items; printing the value hung for minutes."""
    nested: list = ["x"] * 9
    for _ in range(8):
        nested = [nested] * 9
    started = time.monotonic()
    with pytest.raises(UsageError) as caught:
        JobSpec.from_recipe(None, **{"generation.max_new_tokens": nested})
    assert len(str(caught.value)) < 300 and time.monotonic() - started < 5


@pytest.mark.parametrize("content,expected", [
    ("key,question\nastronaut,caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    (b'{"key": "astronaut", "questions": 5}\n', "must be text"),
    (b"key,question\nastronaut," + b"x" * 200_000 + b"\n", r"q.csv:2: not valid CSV \(field larger than field limit"),
    # what was once silently dropped: empty questions, a null key, an unterminated quote
    (b'{"key": "a", "question": "ok"}\n{"key": "b", "question": null}\n', r"q.jsonl:2: an empty question"),
    (b'{"key": "a", "questions": ["ok", " "]}\n', r"q.jsonl:1: an empty question"),
    (b'{"key": "a", "questions": []}\n', r"q.jsonl:1: an empty question"),
    (b'{"key": null, "question": "ok"}\n', r"q.jsonl:1: 'key' must be a non-empty text or number \(got null\)"),
    (b"key,question\na,fine\nb,\n", r"q.csv:3: empty question"),
    (b"key,question\na,fine\n,orphan\n", r"q.csv:3: empty key"),
    (b'key,question\na,fine\nb,"what is\nc,fine\n', r"q.csv:3: not valid CSV \(unexpected end of data\); check the quotes"),
])
def test_unreadable_questions_files_are_one_usage_error(tmp_path, content, expected):
    """Never a traceback, and never a question dropped without a word (the line is named)."""
    path = tmp_path / ("q.jsonl" if content.startswith(b"{") else "q.csv")
    path.write_bytes(content)
    with pytest.raises(UsageError, match=expected):
        load_questions_file(path)


def test_questions_files_that_are_fine_still_read(tmp_path):
    """Multi-line quoted CSV questions, number keys and several lines for one key."""
    csv_file = tmp_path / "q.csv"
    csv_file.write_text('key,question\na,"two\nlines"\n,\na,second\n')
    assert load_questions_file(csv_file) == {"a": ["two\nlines", "second"]}, "an empty row is skipped like a blank line"
    csv_file.write_text('key,question\na,"two\nlines"\n,orphan\n')
    with pytest.raises(UsageError, match=r"q.csv:4: empty key"):
        load_questions_file(csv_file)
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"key": 7, "question": "one"}\n\n{"key": "7", "questions": ["two", 3]}\n{"key": 1.5, "question": "x"}\n')
    assert load_questions_file(jsonl) == {"7": ["one", "two", "3"], "1.5": ["x"]}


@pytest.mark.parametrize("option,value", [("seed", 10**30), ("batch_size", 10**9), ("temperature", float("inf")),
                                          ("prefill_batch", 10**12), ("max_new_tokens", 10**9),
                                          ("prefetch", 10**20), ("prefetch", 1e20), ("workers", 10**8),
                                          ("read_retries", 10**6), ("world_size", 10**23)])
def test_out_of_range_numbers_are_refused_before_any_allocation(option, value):
    with pytest.raises(UsageError, match=option):
        JobSpec.from_recipe(None, **{option: value})


def test_status_of_state_files_with_wrong_types_is_one_usage_error(tmp_path):
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    (out / "job.json").write_text(json.dumps({"model": "m", "spec": 5}))
    with pytest.raises(UsageError, match="wrong type"):
        collect_status(Path(out))
    (out / "job.json").write_text(json.dumps({"model": "m", "spec": {}}))
    (out / "progress.json").write_text(json.dumps({"world_size": 1, "rank": 0, "shards_total": None}))
    with pytest.raises(UsageError, match="wrong type"):
        collect_status(Path(out))


def test_a_state_file_that_cannot_be_read_is_not_called_corrupt(tmp_path):
    """Unreadable (permissions, a folder in its place) is not corrupt: deleting it is the wrong fix."""
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    (out / "job.json").mkdir()
    with pytest.raises(UsageError, match=r"cannot read .*job\.json \(Is a directory\); it must be a readable file") as caught:
        collect_status(Path(out))
    assert "corrupt" not in str(caught.value)
    (out / "job.json").rmdir()
    (out / "job.json").write_text("{")
    with pytest.raises(UsageError, match=r"job\.json is corrupt"):
        collect_status(Path(out))
    from dvl_batch.sources import FolderManifest

    (out / "folder_shards.json").mkdir()
    with pytest.raises(UsageError, match=r"cannot read .*folder_shards\.json \(Is a directory\)"):
        FolderManifest(out / "folder_shards.json")


def test_an_output_path_through_a_file_is_a_usage_error(tmp_path):
    from dvl_batch.sink.output import OutputDir

    (tmp_path / "afile").write_text("not a folder")
    for path in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(UsageError, match="is a file, not a folder"):
            OutputDir(str(path)).prepare()


def test_a_null_image_in_a_parquet_list_is_that_rows_error_never_dropped(tmp_path):
    """A list of images with a null among them: dropping it would pair the prompt's images
    with the wrong pictures (or fewer of them) without a word."""
    photo = image_bytes("coffee.jpg")
    images = pa.array([[photo, None, photo], [photo, photo], None], pa.list_(pa.binary()))
    path = write_parquet(tmp_path / "lists.parquet", {"key": ["gap", "whole", "none"], "images": images})
    (listed,) = discover_shards([str(path)], 100)
    items = list(read_shard(listed))
    samples = {s.key: s for s in items if isinstance(s, RawSample)}
    assert isinstance(items[-1], ShardEnd) and len(samples) == 3
    assert "image 2 of the 3 in its list is null" in samples["gap"].error
    assert samples["whole"].error is None and len(samples["whole"].images) == 2
    assert "null" in samples["none"].error


def test_an_empty_input_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.jpg").write_bytes(image_bytes("coffee.jpg"))
    for inputs in ([""], ["  "], ["shards", ""]):
        with pytest.raises(UsageError, match=r"an input is empty \(''\)"):
            discover_shards(inputs, 100)


def _without_permission_override() -> list[str]:
    """A command prefix under which chmod 000 holds: root reads everything unless its
    capabilities to override file permissions are dropped."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be denied here")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.parametrize("command", ["caption", "inspect"])
def test_a_folder_that_cannot_be_read_is_one_clear_error_not_skipped(tmp_path, cache_dir, command):
    """os.walk skips folders it cannot list: the job would leave their images out without a word."""
    data = tmp_path / "data"
    for folder in (data, data / "locked"):
        folder.mkdir()
        (folder / "a.jpg").write_bytes(image_bytes("coffee.jpg"))
    (data / "locked").chmod(0)
    try:
        for target in (data, data / "locked", data / "locked" / "a.jpg"):
            args = [command, str(target)] + (["-o", str(tmp_path / "out"), "--model", "tiny"] if command == "caption" else [])
            done = subprocess.run([*_without_permission_override(), sys.executable, "-m", "dvl_batch", *args],
                                  env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot read the"), done.stderr
            assert "locked" in lines[0] and "Permission denied" in lines[0]
        assert not (tmp_path / "out").exists()
        (data / "locked").rename(data / "lost+found")  # a file system's own root-only folder is no input
        done = subprocess.run([*_without_permission_override(), sys.executable, "-m", "dvl_batch", "inspect", str(data)],
                              env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "error" not in done.stderr, done.stderr
    finally:
        for folder in (data / "locked", data / "lost+found"):
            if folder.exists():
                folder.chmod(0o755)


def test_status_never_opens_a_fifo_in_parts_or_checkpoints(tmp_path):
    """Opening a FIFO blocks until a writer comes: status hung for ever on one."""
    import threading

    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / "job.json").write_text(json.dumps({"model": "m", "spec": {}}))
    os.mkfifo(out / "parts" / "zz.parquet")
    os.mkfifo(out / "checkpoints" / "zz.ckpt000001.jsonl")
    done: list = []
    thread = threading.Thread(target=lambda: done.append(collect_status(Path(out))), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert done, "status blocked on a FIFO"


def test_a_later_parquet_shard_without_the_named_key_column_is_its_error_row(tmp_path, cache_dir):
    """Only the first shard is checked up front: a later one without --key-field's column
    stopped the whole job (no parts, the same stop at every rerun)."""
    from dvl_batch import run

    photo = image_bytes("coffee.jpg")
    data = tmp_path / "data"
    write_parquet(data / "a.parquet", {"image": [photo], "name": ["first"]})
    write_parquet(data / "b.parquet", {"image": [photo], "other": ["x"]})
    write_parquet(data / "c.parquet", {"image": [photo], "name": ["third"]})
    spec = JobSpec.from_recipe(None, inputs=[str(data)], output=str(tmp_path / "out"), model="tiny", max_new_tokens=2,
                               workers=0, progress=False, key_field="name")
    result = run(spec, cache_dir=cache_dir, offline=True, say=lambda text: None)
    rows = read_rows(tmp_path / "out").to_pandas()
    assert sorted(rows["key"]) == ["__shard__", "first", "third"] and result.shards_done == 3
    error = rows.set_index("key").loc["__shard__", "error"]
    assert "key column 'name' not found" in error and "b.parquet" in error


def test_a_shard_file_without_read_permission_is_retried_next_run_not_marked_done(tmp_path, cache_dir):
    """Permission denied is fixable: the shard gets no part (a partial part with an error row
    made every rerun say 'nothing to do'), and once readable the rerun answers it."""
    data = tmp_path / "data"
    write_tar(data / "a.tar", [("a.jpg", image_bytes("coffee.jpg"))])
    locked = write_tar(data / "b.tar", [("b.jpg", image_bytes("coffee.jpg"))])
    locked.chmod(0)
    args = [sys.executable, "-m", "dvl_batch", "caption", str(data), "-o", str(tmp_path / "out"), "--model", "tiny",
            "--max-new-tokens", "2", "--workers", "0", "--no-progress"]
    try:
        first = subprocess.run([*_without_permission_override(), *args], env=cli_env(cache_dir), capture_output=True,
                               text=True, timeout=300)
    finally:
        locked.chmod(0o644)
    assert first.returncode != 0 and "Traceback" not in first.stderr, first.stderr
    assert "not read:" in first.stderr and "Permission denied" in first.stderr
    assert sorted(read_rows(tmp_path / "out")["key"].to_pylist()) == ["a"]
    again = subprocess.run(args, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(read_rows(tmp_path / "out")["key"].to_pylist()) == ["a", "b"]


@pytest.mark.parametrize("option", ["--shard-size", "--max-shards"])
def test_inspect_refuses_counts_below_one(option, cache_dir):
    """--shard-size 0 was a traceback (range() arg 3 must not be zero); --max-shards -1 read
    every shard but the last."""
    done = subprocess.run([sys.executable, "-m", "dvl_batch", "inspect", str(Path(__file__).parents[1] / "examples" / "shards"),
                           option, "0"], env=cli_env(cache_dir), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "greater than or equal to 1" in done.stderr
