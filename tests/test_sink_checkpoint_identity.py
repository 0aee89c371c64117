"""Checkpoints say whose rows they hold: a resume never folds another job's rows, or rows of a
shard file since rewritten, into a part (rows are matched to samples by index alone)."""

from __future__ import annotations

import json
import os

import pytest

from dvl_batch import JobSpec, run
from dvl_batch.errors import UsageError
from dvl_batch.records import AnswerRow, ShardEnd
from dvl_batch.sink.checkpoints import Checkpoints, count_rows, source_signature
from dvl_batch.sink.parts import ParquetSink

from .conftest import image_bytes, read_rows, write_tar
from .test_resume_trust import prepared


def _shard(path, prefix: str, n: int):
    names = ["coffee.jpg", "coffee.jpg", "coffee.jpg", "coffee.jpg"][:n]
    return write_tar(path, [(f"{prefix}{i}.jpg", image_bytes(name)) for i, name in enumerate(names)])


def _interrupted(cache_dir, data, out, answered: int, **options):
    """A run stopped after `answered` samples of the one shard: their rows in a checkpoint, no part."""
    job = prepared(cache_dir, [data], out, **options)
    shard = job.todo[0]
    sink = ParquetSink(job.out, job.metadata)
    rows = [AnswerRow(f"old{i}", shard.id, i, 0, "q", "a", 1, 1, "stop") for i in range(answered)]
    sink.checkpoints.write(shard.id, 1, rows, source_signature(shard))
    job.release()
    return shard


def test_checkpoints_of_another_job_are_refused_without_job_json(tmp_path, cache_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    _shard(data / "s.tar", "k", 3)
    _interrupted(cache_dir, data, out, 2, prompt="Prompt A")
    (out / "job.json").unlink()
    with pytest.raises(UsageError, match="its checkpoints .* were written by a different job"):
        prepared(cache_dir, [data], out, prompt="Prompt B")
    assert not (out / "job.json").exists(), "a refused run leaves OUT as it was"
    same = prepared(cache_dir, [data], out, prompt="Prompt A")  # the job that wrote them resumes
    assert same.todo[0].skip == {0, 1}
    same.release()
    assert count_rows(out) == (1, 2), "status counts the rows, not the header line"


def test_a_shard_rewritten_since_its_checkpoints_is_answered_again(tmp_path, cache_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    tar = _shard(data / "s.tar", "k", 3)
    _interrupted(cache_dir, data, out, 2, max_new_tokens=2)
    _shard(tar, "new", 4)  # the same name, other samples
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    job = prepared(cache_dir, [data], out, max_new_tokens=2)
    assert job.todo[0].skip == frozenset() and not list((out / "checkpoints").glob("*.jsonl"))
    assert any("changed since its checkpoints were written" in n for n in job.notices)
    job.release()
    spec = JobSpec.from_recipe(None, inputs=[str(data)], output=str(out), model="tiny", max_new_tokens=2, workers=0,
                               progress=False)
    run(spec, cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert sorted(read_rows(out)["key"].to_pylist()) == ["new0", "new1", "new2", "new3"]


def test_checkpoints_without_a_header_are_trusted_as_before(tmp_path, cache_dir):
    """Files written before the header existed: their samples are still skipped."""
    data, out = tmp_path / "data", tmp_path / "out"
    _shard(data / "s.tar", "k", 3)
    job = prepared(cache_dir, [data], out)
    shard = job.todo[0]
    row = json.dumps({"key": "k0", "shard": shard.id, "sample_index": 0, "question_index": 0, "question": "q",
                      "answer": "a", "prompt_tokens": 1, "generated_tokens": 1, "finish_reason": "stop", "error": None})
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / f"{shard.id}.ckpt000001.jsonl").write_text(row)
    job.release()
    again = prepared(cache_dir, [data], out)
    assert again.todo[0].skip == {0}
    assert Checkpoints.header(out / "checkpoints" / f"{shard.id}.ckpt000001.jsonl") == {}
    again.release()


def test_a_folder_image_rewritten_since_its_checkpoints_has_its_chunk_answered_again(tmp_path, cache_dir):
    """A folder chunk's signature covers its images' names, sizes and times; an untouched
    folder resumes (also from another working directory), a rewritten image does not."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (data / name).write_bytes(image_bytes("coffee.jpg"))
    _interrupted(cache_dir, data, out, 2)
    job = prepared(cache_dir, [data], out)
    assert job.todo[0].skip == {0, 1} and not any("changed since" in n for n in job.notices)
    job.release()
    (data / "b.jpg").write_bytes(image_bytes("coffee.jpg") + b"\0")  # same name, other bytes
    job = prepared(cache_dir, [data], out)
    assert job.todo[0].skip == frozenset() and any("changed since its checkpoints were written" in n for n in job.notices)
    job.release()


def _checkpointed_run(cache_dir, inputs, out, rows_for):
    """A run stopped with `rows_for(shard)` in a checkpoint, then the same job run to the end."""
    job = prepared(cache_dir, inputs, out, max_new_tokens=2)
    shard = job.todo[0]
    ParquetSink(job.out, job.metadata).checkpoints.write(shard.id, 1, rows_for(shard), source_signature(shard))
    job.release()
    spec = JobSpec.from_recipe(None, inputs=[str(i) for i in inputs], output=str(out), model="tiny", max_new_tokens=2,
                               workers=0, progress=False)
    run(spec, cache_dir=cache_dir, offline=True, say=lambda text: None)
    return read_rows(out).to_pandas().sort_values("sample_index")


def test_a_pipe_shard_whose_samples_changed_is_answered_again_not_given_old_rows(tmp_path, cache_dir):
    """pipe: and URL shards have no file to stat: the checkpointed key at each index is compared
    with the key read there, and rows past the shard's end are dropped."""
    tar = _shard(tmp_path / "t.tar", "k", 3)
    source = f"pipe:cat {tar}"

    def stale(shard):  # another content's keys at 0 and 1, and an index this shard does not have
        return [AnswerRow(key, shard.id, i, 0, "q", "old", 1, 1, "stop") for key, i in (("x", 0), ("y", 1), ("z", 7))]

    rows = _checkpointed_run(cache_dir, [source], tmp_path / "out", stale)
    assert rows["key"].tolist() == ["k0", "k1", "k2"] and "old" not in rows["answer"].tolist()

    def same(shard):  # the keys read there: trusted, not answered again
        return [AnswerRow(f"k{i}", shard.id, i, 0, "q", "old", 1, 1, "stop") for i in (0, 1)]

    rows = _checkpointed_run(cache_dir, [source], tmp_path / "out2", same)
    assert rows["key"].tolist() == ["k0", "k1", "k2"] and rows["answer"].tolist()[:2] == ["old", "old"]
    assert rows["answer"].tolist()[2] != "old"


@pytest.mark.parametrize("damage", ["missing fields", "extra field", "string index", "folder", "fifo"])
def test_a_damaged_checkpoint_is_redone_never_a_traceback(tmp_path, cache_dir, damage):
    """Hand-edited rows, or a folder or FIFO where a checkpoint file would be: its samples are
    answered again (a FIFO is never opened: that would block)."""
    data, out = tmp_path / "data", tmp_path / "out"
    _shard(data / "s.tar", "k", 2)
    job = prepared(cache_dir, [data], out, max_new_tokens=2)
    shard = job.todo[0]
    job.release()
    path = out / "checkpoints" / f"{shard.id}.ckpt000001.jsonl"
    path.parent.mkdir(exist_ok=True)
    good = {"key": "k0", "shard": shard.id, "sample_index": 0, "question_index": 0, "question": "q", "answer": "a",
            "prompt_tokens": 1, "generated_tokens": 1, "finish_reason": "stop", "error": None}
    if damage == "folder":
        path.mkdir()
    elif damage == "fifo":
        os.mkfifo(path)
    else:
        record = {"missing fields": {"sample_index": 0}, "extra field": {**good, "new_col": 1},
                  "string index": {**good, "sample_index": "0"}}[damage]
        path.write_text(json.dumps(record) + "\n")
    again = prepared(cache_dir, [data], out, max_new_tokens=2)
    assert again.todo[0].skip == frozenset()
    again.release()
    assert count_rows(out)[1] == 0
    spec = JobSpec.from_recipe(None, inputs=[str(data)], output=str(out), model="tiny", max_new_tokens=2, workers=0,
                               progress=False)
    run(spec, cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert sorted(read_rows(out)["key"].to_pylist()) == ["k0", "k1"]


def test_an_edited_questions_file_is_refused_not_given_to_the_shards_left(tmp_path, cache_dir):
    """The job names its questions file by path: editing the file between runs gave the shards
    still to do other questions than the parts hold. Its content digest is kept in job.json."""
    data, out = tmp_path / "data", tmp_path / "out"
    _shard(data / "s.tar", "k", 2)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"key": "k0", "question": "What is this?"}\n')
    options = {"task": "vqa", "questions_file": str(questions)}
    prepared(cache_dir, [data], out, **options).release()
    prepared(cache_dir, [data], out, **options).release()  # unchanged: resumes
    record = json.loads((out / "job.json").read_text())
    record.pop("questions_file_sha256")
    (out / "job.json").write_text(json.dumps(record))  # a job.json written before the digest existed
    prepared(cache_dir, [data], out, **options).release()
    assert "questions_file_sha256" in json.loads((out / "job.json").read_text()), "adopted on resume"
    questions.write_text('{"key": "k0", "question": "Is it red?"}\n')
    with pytest.raises(UsageError, match=r"the questions file .*q\.jsonl changed since the job"):
        prepared(cache_dir, [data], out, **options)
    prepared(cache_dir, [data], out, overwrite=True, **options).release()  # --overwrite starts the job again
    prepared(cache_dir, [data], out, **options).release()


def test_a_sample_answered_again_replaces_all_its_old_rows_at_the_fold(tmp_path, cache_dir):
    """Replacing row by row kept the old sample's extra questions (its new answer had fewer)."""
    data, out = tmp_path / "data", tmp_path / "out"
    _shard(data / "s.tar", "k", 2)
    job = prepared(cache_dir, [data], out)
    shard = job.todo[0]
    sink = ParquetSink(job.out, job.metadata)
    old = [AnswerRow("old", shard.id, 0, q, f"q{q}", "a", 1, 1, "stop") for q in range(3)]
    kept = [AnswerRow("k1", shard.id, 1, 0, "q0", "a", 1, 1, "stop")]
    files = [sink.checkpoints.write(shard.id, 1, old + kept), sink.checkpoints.write(shard.id, 2, [
        AnswerRow("k0", shard.id, 0, 0, "q0", "again", 1, 1, "stop")])]
    sink.write(shard, ShardEnd(shard, 2), [], checkpoints=files)
    job.release()
    rows = read_rows(out).to_pandas()
    assert list(zip(rows["key"], rows["question_index"], rows["answer"], strict=True)) == [("k0", 0, "again"), ("k1", 0, "a")]
