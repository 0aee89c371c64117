"""Hostile inputs at the source, in process: bounded reads, special files, bytes-safe names,
duplicate keys, hard links, pixel limits inside containers, extra image formats, mixed folders,
OUT inside the input, and special-token text typed by a user. Every input is made here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import pyarrow as pa
import pytest
from PIL import Image, features

from dvl_batch.errors import UsageError
from dvl_batch.preprocess.images import ImageError, decode_image
from dvl_batch.records import RawSample, Shard, ShardEnd
from dvl_batch.sources import FolderManifest, discover_shards, name_of_key, read_shard
from dvl_batch.sources.formats import is_image_name

from .conftest import REPO, image_bytes, write_parquet
from .hostile_files import encode


def read_all(shard: Shard, **kwargs) -> tuple[list[RawSample], ShardEnd]:
    items = list(read_shard(shard, **kwargs))
    assert isinstance(items[-1], ShardEnd) and all(isinstance(i, RawSample) for i in items[:-1])
    return items[:-1], items[-1]


def tar_shard(path, members, **kwargs) -> Shard:
    """A tar written with raw member names (undecodable bytes pass through surrogateescape)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as archive:
        for name, data in members:
            if isinstance(data, tarfile.TarInfo):
                archive.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return Shard("t", str(path), "webdataset")


def hard_link(name: str, target: str) -> tuple[str, tarfile.TarInfo]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return name, info


def test_members_files_and_values_over_the_byte_cap_are_error_rows_never_read(tmp_path):
    photo = image_bytes("coffee.jpg")
    big = b"\xff" * 5000
    samples, end = read_all(tar_shard(tmp_path / "s.tar", [("a.jpg", photo[:900]), ("big.jpg", big), ("c.jpg", photo[:900])]),
                            max_bytes=1000)
    assert [s.key for s in samples] == ["a", "big", "c"] and not end.partial
    assert samples[0].error is None and samples[2].error is None
    assert "file too large: 5,000 bytes exceeds the limit of 1,000" in samples[1].error and not samples[1].images
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "big.jpg").write_bytes(big)
    folder, _ = read_all(Shard("f", str(tmp_path / "f"), "folder", members=("big.jpg",)), max_bytes=1000)
    assert "file too large" in folder[0].error
    write_parquet(tmp_path / "p.parquet", {"key": ["x", "y"], "image": pa.array([big, photo[:10]], pa.binary())})
    rows, _ = read_all(Shard("p", str(tmp_path / "p.parquet"), "parquet"), max_bytes=1000)
    assert "file too large" in rows[0].error and rows[1].error is None


def test_bombs_stay_far_below_1_5_gb_of_memory(tmp_path):
    """The issue's three bombs (2 MB .tgz of a 2 GB zero member, 10 KB sparse tar of 2 GB, an ICO
    holding a 30000x30000 PNG), each read and decoded in a fresh process that reports its peak RSS."""
    report = tmp_path / "bombs.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bomb_memory.py"), "--json", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    results = {r["input"]: r for r in json.loads(report.read_text())["results"]}
    assert set(results) == {"zeros.tgz", "sparse.tar", "icon.tar"}
    for name, result in results.items():
        assert result["peak_rss_bytes"] < 1.5e9, (name, result)
        assert len(result["errors"]) == 1, (name, result)
    assert "file too large" in results["zeros.tgz"]["errors"][0] and "file too large" in results["sparse.tar"]["errors"][0]
    assert "30000x30000 pixels exceeds the limit" in results["icon.tar"]["errors"][0]


def test_fifo_named_like_an_image_is_never_opened(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(image_bytes("coffee.jpg"))
    os.mkfifo(folder / "m.jpg")
    shards = discover_shards([str(folder)], 100)
    assert [s.members for s in shards] == [("good.jpg",)]
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(read_all(Shard("f", str(folder), "folder", members=("m.jpg",)))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert outcome, "reading a FIFO blocked"
    assert "not a regular file" in outcome[0][0][0].error


def test_undecodable_names_get_keys_that_round_trip_and_parts_store_them(tmp_path):
    from dvl_batch.records import AnswerRow
    from dvl_batch.sink.output import OutputDir
    from dvl_batch.sink.parts import ParquetSink

    photo = image_bytes("coffee.jpg")
    samples, _ = read_all(tar_shard(tmp_path / "s.tar", [("bad\udcff.jpg", photo), ("ok.jpg", photo)]))
    assert [s.key for s in samples] == ["bad\\xff", "ok"] and samples[0].error is None
    assert os.fsencode(name_of_key(samples[0].key)) == b"bad\xff"
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(photo)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(photo)
    (shard,) = discover_shards([str(folder)], 100)
    rows, _ = read_all(shard)
    assert sorted(r.key for r in rows) == ["caf\\xe9.jpg", "ok.jpg"] and all(r.error is None for r in rows)
    assert {os.fsencode(name_of_key(r.key)) for r in rows} == {b"caf\xe9.jpg", b"ok.jpg"}
    out = OutputDir(tmp_path / "out")
    out.parts.mkdir(parents=True)
    row = AnswerRow("bad\udcff", "t", 0, 0, "q", None, 0, 0, "error", "cannot read 'bad\udcff.jpg'")
    path = ParquetSink(out, {}).write(Shard("t", "u\udcff", "webdataset"), ShardEnd(Shard("t", "u", "webdataset"), 1), [row])
    assert pa.parquet.read_table(path)["key"].to_pylist() == ["bad\\xff"]


def test_duplicate_keys_are_renamed_and_counted_never_merged(tmp_path):
    good, junk = image_bytes("coffee.jpg"), b"junk that is not an image"
    samples, end = read_all(tar_shard(tmp_path / "s.tar", [("a.jpg", good), ("b.jpg", good), ("a.jpg", good),
                                                          ("c.jpg", good), ("c.jpg", junk)]))
    assert [s.key for s in samples] == ["a", "b", "a#2", "c", "c#2"]
    assert samples[3].images == [good] and samples[4].images == [junk], "the good c.jpg was replaced by the junk one"
    assert samples[2].source_key == "a" and end.duplicate_keys == 2 and "2 duplicate keys" in end.message
    from dvl_batch.inspect import inspect_shard

    assert inspect_shard(Shard("t", str(tmp_path / "s.tar"), "webdataset")).duplicate_keys == 2
    write_parquet(tmp_path / "p.parquet", {"key": ["00000000", None, "00000003", "00000003"],
                                           "image": pa.array([good] * 4, pa.binary())})
    rows, end = read_all(Shard("p", str(tmp_path / "p.parquet"), "parquet"))
    assert len({r.key for r in rows}) == 4 and rows[1].key == "__null_key__00000001"
    assert rows[3].key == "00000003#2" and end.duplicate_keys == 1


def test_hard_linked_members_give_one_row_each(tmp_path):
    photo = image_bytes("coffee.jpg")
    samples, _ = read_all(tar_shard(tmp_path / "s.tar", [("a.jpg", photo), hard_link("b.jpg", "a.jpg"),
                                                          hard_link("c.jpg", "gone.jpg")]))
    assert [s.key for s in samples] == ["a", "b", "c"]
    assert samples[1].images == [photo] and samples[1].error is None
    assert "hard link to 'gone.jpg'" in samples[2].error


def test_pixel_limit_holds_for_frames_inside_containers():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bomb_memory import ico_with_png

    with pytest.raises(ImageError, match="30000x30000 pixels exceeds the limit of 89478485"):
        decode_image(ico_with_png(30000), 89_478_485)
    small = encode(Image.new("RGB", (40, 40), (200, 10, 10)), "ICO", sizes=[(32, 32)])
    assert decode_image(small, 89_478_485).size == (32, 32)


@pytest.mark.parametrize("ext,fmt", [("avif", "AVIF"), ("jfif", "JPEG"), ("tga", "TGA")])
def test_avif_jfif_and_tga_are_image_fields_and_folder_images(tmp_path, ext, fmt):
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow cannot write AVIF")
    data = encode(Image.new("RGB", (24, 16), (10, 200, 10)), fmt)
    assert is_image_name(f"x.{ext}")
    samples, _ = read_all(tar_shard(tmp_path / "s.tar", [(f"k.{ext}", data), ("k.txt", b"t")]))
    assert samples[0].error is None and samples[0].image_names == (ext,)
    assert decode_image(samples[0].images[0], 10**6).size == (24, 16)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / f"x.{ext}").write_bytes(data)
    assert discover_shards([str(tmp_path / "f")], 10)[0].members == (f"x.{ext}",)


def test_folder_with_a_stray_parquet_keeps_its_images_and_never_reads_out(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png"):
        (data / name).write_bytes(image_bytes("coffee.jpg"))
    write_parquet(data / "stray.parquet", {"key": ["p"], "image": pa.array([image_bytes("coffee.jpg")], pa.binary())})
    out = data / "out"
    (out / "parts").mkdir(parents=True)
    write_parquet(out / "parts" / "old.parquet", {"key": ["x"]})
    (out / "job.json").write_text("{}")
    (out / "c.jpg").write_bytes(image_bytes("coffee.jpg"))
    shards = discover_shards([str(data)], 10, exclude=(out,))
    assert sorted(s.format for s in shards) == ["folder", "parquet"]
    folder = next(s for s in shards if s.format == "folder")
    assert folder.members == ("a.jpg", "sub/b.png")
    assert discover_shards([str(data)], 10) == shards, "an output folder is skipped even when not named"
    with pytest.raises(UsageError, match="output folder"):
        discover_shards([str(out)], 10, exclude=(out,))


def test_folder_manifest_never_reuses_a_chunk_id_and_refuses_corrupt_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(b"x")
    first = FolderManifest(None).shards_for(folder, 2)
    taken = {s.id for s in first}
    (folder / "new.jpg").write_bytes(b"x")
    again = FolderManifest(None, taken=lambda shard_id: shard_id in taken).shards_for(folder, 2)
    assert not {s.id for s in again} & taken, "a new chunk took the id of a finished one"
    corrupt = tmp_path / "folder_shards.json"
    corrupt.write_text('{"x": [')
    with pytest.raises(UsageError, match="folder_shards.json is corrupt .*delete it and rerun"):
        FolderManifest(corrupt)


def test_special_token_text_typed_in_a_question_is_plain_text(tiny_processor):
    from dvl_batch.preprocess.prompts import PromptRenderer

    tokenizer = tiny_processor.tokenizer
    eos = tokenizer.eos_token
    renderer = PromptRenderer(tiny_processor)
    plain = renderer.tokenize("Say hello now", 1).input_ids
    typed = renderer.tokenize(f"Say {eos} now", 1).input_ids
    assert tokenizer.eos_token_id in tokenizer(f"Say {eos} now", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in typed and typed.count(renderer.image_token_id) == 576
    assert tokenizer.decode(typed[-40:]).count(eos) == 1, "the typed text is kept, as text"
    assert renderer._ids_plain_user_text("Say hello now", 1) == plain, "same ids as the usual path without typed tokens"
    turns = PromptRenderer(tiny_processor, system_prompt=f"Never write {eos}.",
                           turns=(("user", "Hi"), ("assistant", "Hello")))
    ids = turns.tokenize("Describe it.", 1).input_ids
    assert ids.count(tokenizer.eos_token_id) == 1, "only the template's EOS after the assistant turn is special"


def test_links_to_images_are_read_and_links_to_folders_are_not_followed(tmp_path):
    """What the README says of links in an input folder (following folder links could loop or
    leave the tree)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.jpg").write_bytes(image_bytes("coffee.jpg"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "here.jpg").write_bytes(image_bytes("coffee.jpg"))
    (data / "linked.jpg").symlink_to(elsewhere / "far.jpg")
    (data / "linked-folder").symlink_to(elsewhere, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)
    (shard,) = discover_shards([str(data)], 100, FolderManifest(None))
    assert shard.members == ("here.jpg", "linked.jpg")


def test_a_folder_or_image_inside_another_folder_input_is_refused_not_answered_twice(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for where in (data, data / "sub"):
        (where / "a.jpg").write_bytes(image_bytes("coffee.jpg"))
    tar = data / "s.tar"
    tar_shard(tar, [("k.jpg", image_bytes("coffee.jpg"))])
    for inner in (data / "sub", data / "a.jpg"):
        with pytest.raises(UsageError, match="lies inside the input folder .*answered twice"):
            discover_shards([str(data), str(inner)], 100, FolderManifest(None))
    shards = discover_shards([str(data), str(tar), str(data)], 100, FolderManifest(None))
    assert sorted(s.format for s in shards) == ["folder", "webdataset"], "a shard file or folder named twice is one shard"
    assert len(discover_shards([str(data / "sub"), str(data / "a.jpg")], 100, FolderManifest(None))) == 2


def test_an_input_that_is_also_the_output_folder_is_refused_saying_so(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(image_bytes("coffee.jpg"))
    with pytest.raises(UsageError, match="is this run's output folder .* as well as its input"):
        discover_shards([str(data)], 100, FolderManifest(None), exclude=(data,))


def test_inputs_inside_a_folder_input_that_are_not_read_twice_are_allowed(tmp_path):
    """Only what the folder's search would also reach is refused: shard files (one shard by
    their path), a hidden folder's images and an output folder's are not."""
    data = tmp_path / "data"
    for folder in ("tars", ".hidden"):
        (data / folder).mkdir(parents=True)
    (data / "a.jpg").write_bytes(image_bytes("coffee.jpg"))
    (data / ".hidden" / "h.jpg").write_bytes(image_bytes("coffee.jpg"))
    tar_shard(data / "tars" / "s.tar", [("k.jpg", image_bytes("coffee.jpg"))])
    for inner, expected in (("tars", 2), (".hidden", 3)):  # the tar once; the hidden folder's chunk of its own
        shards = discover_shards([str(data), str(data / inner)], 100, FolderManifest(None))
        assert len(shards) == expected, shards
