"""sources: readers never raise for bad content; cut shards keep their rows and say they are partial."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dvl_batch.records import RawSample, Shard, ShardEnd
from dvl_batch.sources import SHARD_ROW_KEY, read_shard

from .conftest import image_bytes, write_parquet, write_tar
from .hostile_files import UNSAFE_NAMES, cut_at_member_boundary, cut_tar, unsafe_names_shard

KEYS = ["k0", "k1", "k2", "k3", "k4"]


def read_all(path, fmt: str = "webdataset", **options) -> tuple[list[RawSample], ShardEnd]:
    items = list(read_shard(Shard("s", str(path), fmt), **options))
    *samples, end = items
    assert isinstance(end, ShardEnd) and all(isinstance(s, RawSample) for s in samples)
    assert [s.index for s in samples] == list(range(len(samples))) and end.n_samples == len(samples)
    return samples, end


def test_complete_tar_is_not_partial(tmp_path):
    path = write_tar(tmp_path / "ok.tar", [(f"{k}.jpg", image_bytes("chelsea.jpg")) for k in KEYS[:2]])
    samples, end = read_all(path)
    assert [s.key for s in samples] == KEYS[:2] and not any(s.error for s in samples)
    assert not end.partial and end.message is None


@pytest.mark.parametrize("gzip_it", [False, True], ids=["tar", "tgz"])
def test_tar_cut_inside_a_member_keeps_earlier_samples(tmp_path, gzip_it):
    path = cut_tar(tmp_path / ("cut.tgz" if gzip_it else "cut.tar"), KEYS, cut_in_member=3, gzip_it=gzip_it)
    samples, end = read_all(path)
    assert [s.key for s in samples] == KEYS[:4]
    assert not any(s.error for s in samples[:3]) and all(s.images for s in samples[:3])
    assert "shard cut inside this sample ('k3.jpg')" in samples[3].error
    assert end.partial and "after 3 complete samples" in end.message


def test_tar_cut_at_a_member_boundary_is_partial_not_silently_complete(tmp_path):
    path = cut_at_member_boundary(tmp_path / "short.tar", KEYS, keep=2)
    samples, end = read_all(path)
    assert [s.key for s in samples] == KEYS[:2] and not any(s.error for s in samples)
    assert end.partial and "end-of-archive" in end.message


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive at all" * 40], ids=["zero-bytes", "garbage"])
def test_unreadable_tar_gives_one_shard_error_row(tmp_path, content):
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    samples, end = read_all(path)
    assert [s.key for s in samples] == [SHARD_ROW_KEY] and "unreadable tar shard" in samples[0].error
    assert end.partial


def test_absolute_and_parent_member_names_are_error_rows_never_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samples, end = read_all(unsafe_names_shard(tmp_path / "unsafe.tar"))
    by_key = {s.key: s for s in samples}
    assert set(by_key) == {"before", "after", *UNSAFE_NAMES}
    assert by_key["before"].images and by_key["after"].images and not by_key["after"].error
    for name in UNSAFE_NAMES:
        assert by_key[name].error == f"unsafe tar member name '{name}' skipped" and not by_key[name].images
    assert not end.partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsafe.tar"]  # nothing was extracted anywhere


def test_webdataset_shard_without_image_field_names_the_fields_found(tmp_path):
    path = write_tar(tmp_path / "text.tar", [("a.txt", b"a caption"), ("a.json", b"{}"), ("b.txt", b"another")])
    samples, _ = read_all(path)
    assert [s.key for s in samples] == ["a", "b"]
    assert "no image" in samples[0].error and "fields found: json, txt" in samples[0].error
    assert "fields found: txt" in samples[1].error
    named, _ = read_all(path, image_field="png")
    assert "expected 'png', fields found: json, txt" in named[0].error


def test_parquet_null_and_non_image_bytes_are_samples_with_errors_or_bytes(tmp_path):
    good = image_bytes("chelsea.jpg")
    path = write_parquet(tmp_path / "p.parquet", {
        "key": ["good", "null", "garbage", "empty"],
        "image": pa.array([good, None, b"\x00not an image", b""], pa.binary()),
    })
    samples, end = read_all(path, "parquet")
    by_key = {s.key: s for s in samples}
    assert by_key["good"].images == [good] and not by_key["good"].error
    assert "no image data in column 'image' (null)" in by_key["null"].error
    assert by_key["garbage"].images == [b"\x00not an image"]  # decoding turns it into an error row later
    assert by_key["empty"].images == [b""]
    assert not end.partial


def test_parquet_image_struct_with_neither_bytes_nor_path(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = write_parquet(tmp_path / "hf.parquet", {
        "image": pa.array([{"bytes": image_bytes("coffee.jpg"), "path": None}, {"bytes": None, "path": None}], struct),
    })
    samples, _ = read_all(path, "parquet")
    assert samples[0].images and "(null)" in samples[1].error


def test_parquet_without_image_column_gives_an_error_row_per_sample(tmp_path):
    path = write_parquet(tmp_path / "noimg.parquet", {"key": ["a", "b"], "caption": ["x", "y"], "n": [1, 2]})
    samples, _ = read_all(path, "parquet")
    assert [s.key for s in samples] == ["a", "b"]
    assert all("no image column found; columns: key, caption, n" in s.error for s in samples)


def test_corrupt_parquet_file_gives_one_shard_error_row(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 100)
    samples, end = read_all(path, "parquet")
    assert [s.key for s in samples] == [SHARD_ROW_KEY] and "unreadable parquet file" in samples[0].error
    assert end.partial


def test_shard_bytes_counts_local_files_and_folder_chunks_and_not_remote_urls(tmp_path):
    """What `batch.compile: auto` weighs: the bytes left to read, where they are known without reading."""
    from dvl_batch.records import Shard
    from dvl_batch.sources import shard_bytes

    tar = tmp_path / "a.tar"
    tar.write_bytes(b"x" * 1000)
    (tmp_path / "imgs").mkdir()
    for name, size in (("1.jpg", 10), ("2.jpg", 20)):
        (tmp_path / "imgs" / name).write_bytes(b"y" * size)
    assert shard_bytes(Shard("a", str(tar), "webdataset")) == 1000
    assert shard_bytes(Shard("f", str(tmp_path / "imgs"), "folder", members=("1.jpg", "2.jpg"))) == 30
    assert shard_bytes(Shard("r", "https://example.com/a.tar", "webdataset")) is None
    assert shard_bytes(Shard("p", "pipe:cat a.tar", "webdataset")) is None
    assert shard_bytes(Shard("gone", str(tmp_path / "missing.tar"), "webdataset")) is None
