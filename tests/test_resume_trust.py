"""Resume trusts only what it can verify: parts that read back and belong to the job, the job's
identity rebuilt from the parts, folder chunks rebuilt from the parts, corrupt state files
refused with one line; and one end-to-end run over a hostile folder that holds its own OUT."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pytest
from rich.console import Console

from dvl_batch.cli_tables import status_table
from dvl_batch.config.spec import JobSpec
from dvl_batch.errors import UsageError
from dvl_batch.inspect import collect_status
from dvl_batch.records import AnswerRow, ShardEnd
from dvl_batch.runtime.job import prepare_job
from dvl_batch.runtime.session import checked_spec
from dvl_batch.sink.parts import ParquetSink

from .conftest import image_bytes, read_rows, run_cli, write_parquet, write_tar

FAST = ["--max-new-tokens", "2", "--workers", "1", "--no-progress", "--model", "tiny"]


def prepared(cache_dir, inputs, out, **options):
    spec = JobSpec.from_recipe(None, inputs=[str(i) for i in inputs], output=str(out), model="tiny", **options)
    return prepare_job(checked_spec(spec), cache_dir, offline=True)


def finish(job, shards=None) -> None:
    """Write a part for each of `shards` (default: every open one) as a run would, then unlock."""
    sink = ParquetSink(job.out, job.metadata)
    for shard in shards if shards is not None else job.todo:
        keys = shard.members or ("k",)
        rows = [AnswerRow(k, shard.id, i, 0, "q", "a", 1, 1, "stop") for i, k in enumerate(keys)]
        sink.write(shard, ShardEnd(shard, len(rows)), rows)
    job.release()


@pytest.fixture
def two_shards(tmp_path):
    data = tmp_path / "data"
    for name in ("a", "b"):
        write_tar(data / f"{name}.tar", [("k.jpg", image_bytes("coffee.jpg"))])
    return data, tmp_path / "out"


def test_parts_that_do_not_read_back_or_belong_to_another_job_are_redone(two_shards, cache_dir):
    data, out = two_shards
    finish(prepared(cache_dir, [data], out))
    a, b = sorted((out / "parts").glob("*.parquet"))
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])  # truncated by hand
    other = prepared(cache_dir, [data], out)
    other.release()
    stranger = ParquetSink(other.out, {**other.metadata, "fingerprint": "0123456789abcdef"})
    stranger.write(next(s for s in other.shards if s.id == b.stem), None, [])
    job = prepared(cache_dir, [data], out)
    job.release()
    assert {s.id for s in job.todo} == {a.stem, b.stem}
    assert any("does not read back" in n for n in job.notices) and any("another job" in n for n in job.notices)
    status = collect_status(out)  # status must not crash on the cut part
    assert status["shards_done"] == 1 and len(status["unreadable_parts"]) == 1


def test_a_start_reads_only_footers_of_new_or_changed_parts(two_shards, cache_dir, monkeypatch):
    """Footers verified by one start are not read again by the next while a part's size and
    modification time stay the same; a part changed since is read, and redone if it fails."""
    from dvl_batch.sink import verify

    data, out = two_shards
    finish(prepared(cache_dir, [data], out))
    reads = []
    real = verify.part_record
    monkeypatch.setattr(verify, "part_record", lambda path: reads.append(path.name) or real(path))
    first = prepared(cache_dir, [data], out)
    first.release()
    assert not first.todo and len(reads) == 2  # verified once, remembered
    reads.clear()
    second = prepared(cache_dir, [data], out)
    second.release()
    assert not second.todo and reads == []
    a = sorted((out / "parts").glob("*.parquet"))[0]
    a.write_bytes(a.read_bytes()[:-8])  # cut by hand after it was remembered
    third = prepared(cache_dir, [data], out)
    third.release()
    assert reads == [a.name] and {s.id for s in third.todo} == {a.stem}
    (out / ".verified_parts.json").write_text("{garbled")  # the cache only saves reading
    reads.clear()
    fourth = prepared(cache_dir, [data], out)
    fourth.release()
    assert len(reads) == 2 and {s.id for s in fourth.todo} == {a.stem}
    import json

    b = sorted((out / "parts").glob("*.parquet"))[1]
    assert b.name in json.loads((out / ".verified_parts.json").read_text())
    b.unlink()  # deleted by hand: its entry goes too, the cache does not grow with every part ever written
    fifth = prepared(cache_dir, [data], out)
    fifth.release()
    assert b.name not in json.loads((out / ".verified_parts.json").read_text())
    assert {s.id for s in fifth.todo} == {a.stem, b.stem}


def test_without_job_json_the_parts_name_the_job(two_shards, cache_dir):
    data, out = two_shards
    finish(prepared(cache_dir, [data], out, prompt="Describe this image."))
    (out / "job.json").unlink()
    with pytest.raises(UsageError, match="no job.json and its parts were written by a different job .*prompt"):
        prepared(cache_dir, [data], out, prompt="Something else entirely.")
    job = prepared(cache_dir, [data], out, prompt="Describe this image.")
    job.release()
    assert job.todo == [] and (out / "job.json").exists()


def test_status_works_without_job_json_from_the_parts(two_shards, cache_dir, tmp_path):
    """Deleting job.json is safe (the next run rebuilds it), so `status` must not refuse until then."""
    data, out = two_shards
    job = prepared(cache_dir, [data], out)
    finish(job)
    assert collect_status(out)["notes"] == []
    (out / "job.json").unlink()
    report = collect_status(out)
    assert (report["model"], report["task"], report["shards_done"], report["rows"]) == (job.model.label, "caption", 2, 2)
    assert any("no job.json" in note for note in report["notes"])
    console = Console(width=300, record=True)
    console.print(status_table(out, report))
    text = console.export_text()
    assert "no job.json" in text and job.model.label in text
    with pytest.raises(UsageError, match="not a dvl-batch output folder"):
        collect_status(tmp_path / "data")  # nothing of a run in it


def test_corrupt_state_files_give_one_line_with_the_fix(two_shards, cache_dir):
    data, out = two_shards
    finish(prepared(cache_dir, [data], out))
    (out / "progress.json").write_text("{not json")
    with pytest.raises(UsageError, match="progress.json is corrupt .*delete it"):
        collect_status(out)
    (out / "job.json").write_text("[1, 2")
    with pytest.raises(UsageError, match="job.json is corrupt .*delete it and rerun"):
        prepared(cache_dir, [data], out)
    (out / "job.json").unlink()
    job = prepared(cache_dir, [data], out)  # rebuilt from the parts, as the message promised
    job.release()
    assert job.todo == []


@pytest.mark.parametrize("damage", ["delete", "drop-one-chunk"])
def test_new_images_are_processed_after_folder_shards_json_is_lost(tmp_path, cache_dir, damage):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    folder.mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        (folder / name).write_bytes(image_bytes("coffee.jpg"))
    finish(prepared(cache_dir, [folder], out, shard_size=2))
    manifest = out / "folder_shards.json"
    if damage == "delete":
        manifest.unlink()
    else:
        data = json.loads(manifest.read_text())
        (chunks,) = data.values()
        del chunks[0]
        manifest.write_text(json.dumps(data))
    (folder / "0.jpg").write_bytes(image_bytes("coffee.jpg"))  # sorts before every finished image
    job = prepared(cache_dir, [folder], out, shard_size=2)
    job.release()
    assert [s.members for s in job.todo] == [("0.jpg",)]
    assert sorted(m for s in job.shards for m in s.members) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]


def test_hostile_folder_end_to_end(tmp_path, cache_dir):
    """A folder of images plus a stray parquet, a FIFO, an undecodable name, duplicate keys, hard
    links and more shards queued after them, with OUT inside it: every sample answered once, twice."""
    data = tmp_path / "data"
    data.mkdir()
    photo = image_bytes("coffee.jpg")
    (data / "a.jpg").write_bytes(photo)
    with open(os.path.join(os.fsencode(data), b"bad\xff.jpg"), "wb") as handle:
        handle.write(photo)
    os.mkfifo(data / "m.jpg")
    write_parquet(data / "stray.parquet", {"key": [None, "00000000"], "image": pa.array([photo, photo], pa.binary())})
    with tarfile.open(data / "first.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, blob in (("bad\udcff.jpg", photo), ("a.jpg", photo), ("b.jpg", photo), ("a.jpg", photo)):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        link = tarfile.TarInfo("h.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "b.jpg"
        tar.addfile(link)
    for name in ("second", "third"):
        write_tar(data / f"{name}.tar", [(f"{name}.jpg", photo)])
    out = data / "out"
    args = ["caption", str(data), "-o", str(out), *FAST]
    first = run_cli(args, cache_dir, timeout=300)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    assert "duplicate keys" in first.stderr
    rows = read_rows(out).to_pandas()
    assert sorted(rows["key"]) == sorted(["a.jpg", "bad\\xff.jpg", "__null_key__00000000", "00000000", "bad\\xff",
                                          "a", "b", "a#2", "h", "second", "third"])
    assert rows["error"].isna().all(), rows[["key", "error"]]
    again = run_cli(args, cache_dir, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(read_rows(out)) == len(rows), "the rerun read something new (its own parts?)"
    report = json.loads(run_cli(["status", str(out), "--json"], cache_dir).stdout)
    assert report["duplicate_keys"] == 1 and report["rows"] == len(rows)
    (out / "progress.json").write_text("{")
    status = run_cli(["status", str(out)], cache_dir)
    assert status.returncode == 2 and status.stderr.strip().startswith("error:") and "Traceback" not in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1


def test_a_small_job_resolves_compile_auto_to_off_and_an_explicit_choice_stays(two_shards, cache_dir):
    """The prepared job carries the decided `batch.compile` (what its engines build with): two
    small shards are far under the 2 GB from which compiling pays; on a CPU nothing compiles
    anyway, so no notice is shown there."""
    data, out = two_shards
    job = prepared(cache_dir, [data], out)
    assert job.spec.batch.compile is False and not any("small job" in n for n in job.notices)
    job.release()
    job = prepared(cache_dir, [data], out, compile=True)
    assert job.spec.batch.compile is True
    job.release()


def test_compile_auto_names_no_local_device_for_ray_or_a_gpu_list(two_shards, cache_dir):
    """Ray places the engines elsewhere and `--gpus` names them itself: the small-job notice is
    shown (they may be GPUs) and this machine's `--device` is never resolved for it."""
    data, out = two_shards
    job = prepared(cache_dir, [data], out, runner="ray", device="cuda")  # this machine may have no GPU
    assert job.spec.batch.compile is False and any("small job" in n for n in job.notices)
    job.release()
