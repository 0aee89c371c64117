"""sink: a part appears whole or not at all, whatever interrupts its write; stale temp files go."""

from __future__ import annotations

import errno
import os

import pyarrow.parquet as pq
import pytest

from dvl_batch.errors import OutputError
from dvl_batch.records import AnswerRow, Shard, ShardEnd
from dvl_batch.sink import files as sink_files
from dvl_batch.sink import parts as sink_parts
from dvl_batch.sink.files import atomic_write_json
from dvl_batch.sink.output import OutputDir
from dvl_batch.sink.parts import ParquetSink
from dvl_batch.sink.verify import part_record

SHARD = Shard("shard-a", "/data/a.tar", "webdataset")


def rows(n: int = 3) -> list[AnswerRow]:
    return [AnswerRow(f"k{i}", SHARD.id, i, 0, "q", "answer", 600, 3, "stop") for i in range(n)]


@pytest.fixture
def out(tmp_path):
    folder = OutputDir(tmp_path / "out")
    folder.prepare()
    yield folder
    folder.lock.release()


def leftovers(out: OutputDir) -> list[str]:
    return sorted(p.name for p in out.parts.iterdir())


def test_part_holds_rows_in_order_and_shard_record(out):
    path = ParquetSink(out, {"model": "m"}).write(SHARD, ShardEnd(SHARD, 3, partial=True, message="cut"), rows()[::-1])
    assert pq.read_table(path)["sample_index"].to_pylist() == [0, 1, 2]
    info = part_record(path)["shard"]
    assert info["partial"] is True and info["message"] == "cut" and info["rows"] == 3 and info["errors"] == 0
    assert leftovers(out) == ["shard-a.parquet"]


def failing_write(exc: BaseException):
    real = pq.write_table

    def write_table(table, where, *args, **kwargs):
        real(table, where, *args, **kwargs)  # the temp file is (partly) on disk when the failure hits
        raise exc

    return write_table


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "no space left"), (errno.EROFS, "cannot write to")])
def test_disk_errors_become_one_line_output_errors_and_leave_nothing(out, monkeypatch, code, message):
    monkeypatch.setattr(sink_parts.pq, "write_table", failing_write(OSError(code, os.strerror(code))))
    with pytest.raises(OutputError, match=message) as caught:
        ParquetSink(out, {}).write(SHARD, ShardEnd(SHARD, 3), rows())
    assert "\n" not in str(caught.value)
    assert leftovers(out) == []


def test_interrupt_mid_write_leaves_nothing(out, monkeypatch):
    monkeypatch.setattr(sink_parts.pq, "write_table", failing_write(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ParquetSink(out, {}).write(SHARD, ShardEnd(SHARD, 3), rows())
    assert leftovers(out) == []


def test_failed_json_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "job.json"
    atomic_write_json(target, {"v": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink_files.os, "fsync", no_space)
    with pytest.raises(OutputError, match="no space left"):
        atomic_write_json(target, {"v": 2})
    assert target.read_text().strip() == '{\n  "v": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_prepare_removes_temp_files_a_killed_run_left(tmp_path):
    root = tmp_path / "out"
    (root / "parts").mkdir(parents=True)
    stale = [root / "parts" / ".shard-a.parquet.tmp-999999", root / ".progress.json.tmp-999999"]
    for path in stale:
        path.write_bytes(b"half")
    kept = root / "parts" / "shard-b.parquet"
    kept.write_bytes(b"a finished part is never touched")
    folder = OutputDir(root)
    folder.prepare()
    try:
        assert not any(p.exists() for p in stale) and kept.exists()
        assert folder.done_shards() == {"shard-b"}
    finally:
        folder.lock.release()
