"""Hostile inputs end to end: the real command on every kind of bad file in one job.

Each must become rows (answers for odd-but-valid images, error rows for broken ones), never a
crash or a hang; cut shards keep their earlier rows and are marked partial in their part.
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dvl_batch.errors import EXIT_ERROR_ROWS

from .conftest import image_bytes, read_rows, run_cli, write_parquet, write_tar
from .hostile_files import (
    UNSAFE_NAMES,
    cut_at_member_boundary,
    cut_tar,
    hostile_images,
    png_header_only,
    unsafe_names_shard,
)

PIXEL_LIMIT = 1_000_000
FAST = ["--max-new-tokens", "2", "--workers", "1", "--no-progress", "--model", "tiny"]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, cache_dir, tiny_model_dir):
    """One job over a folder holding every hostile shard; returns (rows, parts by shard name, result)."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    images = hostile_images(PIXEL_LIMIT)
    write_tar(data / "images.tar", [(h.name, h.data) for h in images] + [("good.jpg", image_bytes("rocket.jpg"))])
    write_tar(data / "bombs.tar", [(f"bomb{i}.png", png_header_only(60_000 + i, 60_000)) for i in range(10)])
    unsafe_names_shard(data / "unsafe.tar")
    cut_tar(data / "cut.tar", ["c0", "c1", "c2", "c3"], cut_in_member=2)
    cut_tar(data / "cutgz.tgz", ["g0", "g1", "g2"], cut_in_member=1, gzip_it=True)
    cut_at_member_boundary(data / "short.tar", ["b0", "b1", "b2"], keep=2)
    write_tar(data / "textonly.tar", [("t0.txt", b"a caption"), ("t0.json", b"{}")])
    (data / "empty.tar").write_bytes(b"")
    write_parquet(data / "table.parquet", {
        "key": ["p_good", "p_null", "p_garbage"],
        "image": pa.array([image_bytes("coffee.jpg"), None, b"\x89PNG but not really"], pa.binary()),
    })
    out = root / "out"
    result = run_cli(["caption", str(data), "-o", str(out), "--max-image-pixels", str(PIXEL_LIMIT), *FAST], cache_dir,
                     timeout=600)
    parts = {p.stem.rsplit("-", 1)[0]: p for p in (out / "parts").glob("*.parquet")}
    return read_rows(out).to_pandas(), parts, result, data, out


def shard_info(part) -> dict:
    return json.loads(pq.read_schema(part).metadata[b"dvl_batch"])["shard"]


def test_job_finishes_with_exit_0_and_one_row_per_sample(hostile_run):
    rows, parts, result, _, _ = hostile_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert set(parts) == {"images", "bombs", "unsafe", "cut", "cutgz", "short", "textonly", "empty", "table"}
    assert not rows.duplicated(["shard", "sample_index", "question_index"]).any()
    errors = rows["error"].notna()
    assert (rows.loc[errors, "finish_reason"] == "error").all() and rows.loc[errors, "answer"].isna().all()
    assert rows.loc[~errors, "answer"].notna().all()


def test_each_hostile_image_becomes_the_expected_row(hostile_run):
    rows, _, _, _, _ = hostile_run
    by_key = rows.set_index("key")
    for case in hostile_images(PIXEL_LIMIT):
        row = by_key.loc[case.name.split(".")[0]]
        if case.error:
            assert case.error in row["error"], (case.name, row["error"])
        else:
            assert pd.isna(row["error"]) and row["answer"] is not None, (case.name, row["error"])
    assert pd.isna(by_key.loc["good", "error"])
    bombs = rows[rows["shard"].str.startswith("bombs")]
    assert len(bombs) == 10 and bombs["error"].str.contains("image too large").all()


def test_unsafe_member_names_are_error_rows(hostile_run):
    rows, _, _, _, _ = hostile_run
    unsafe = rows[rows["shard"].str.startswith("unsafe")].set_index("key")
    assert set(unsafe.index) == {"before", "after", *UNSAFE_NAMES}
    assert unsafe.loc[["before", "after"], "error"].isna().all()
    for name in UNSAFE_NAMES:
        assert "unsafe tar member name" in unsafe.loc[name, "error"]


def test_cut_shards_keep_rows_before_the_cut_and_are_marked_partial(hostile_run):
    rows, parts, _, _, _ = hostile_run
    by_key = rows.set_index("key")
    for shard, good, cut in (("cut", ["c0", "c1"], "c2"), ("cutgz", ["g0"], "g1")):
        assert by_key.loc[good, "error"].isna().all() and by_key.loc[good, "answer"].notna().all()
        assert "shard cut inside this sample" in by_key.loc[cut, "error"]
        info = shard_info(parts[shard])
        assert info["partial"] is True and "complete samples" in info["message"], info
    assert by_key.loc[["b0", "b1"], "error"].isna().all()
    assert shard_info(parts["short"])["partial"] is True
    assert shard_info(parts["images"])["partial"] is False


def test_text_only_empty_and_parquet_shards(hostile_run):
    rows, parts, _, _, _ = hostile_run
    by_key = rows.set_index("key")
    assert "fields found: json, txt" in by_key.loc["t0", "error"]
    empty = rows[rows["shard"].str.startswith("empty")]
    assert list(empty["key"]) == ["__shard__"] and "unreadable tar shard" in empty["error"].iloc[0]
    assert shard_info(parts["empty"])["partial"] is True
    assert pd.isna(by_key.loc["p_good", "error"])
    assert "(null)" in by_key.loc["p_null", "error"] and "not an image" in by_key.loc["p_garbage", "error"]


def test_status_counts_partial_shards_and_error_rows(hostile_run, cache_dir):
    rows, _, _, _, out = hostile_run
    status = run_cli(["status", str(out), "--json"], cache_dir)
    report = json.loads(status.stdout)
    assert report["partial_shards"] == 4  # cut, cutgz, short, empty
    assert report["error_rows"] == int(rows["error"].notna().sum()) and report["rows"] == len(rows)


def test_strict_mode_exits_4_for_error_rows_also_when_resuming(hostile_run, cache_dir):
    _, _, _, data, out = hostile_run
    strict = run_cli(["caption", str(data), "-o", str(out), "--max-image-pixels", str(PIXEL_LIMIT), "--strict", *FAST],
                     cache_dir)
    assert strict.returncode == EXIT_ERROR_ROWS, strict.stderr
    lines = [line for line in strict.stderr.splitlines() if line.startswith("strict mode")]
    assert len(lines) == 1 and "rows have errors" in lines[0]
