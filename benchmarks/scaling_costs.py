"""What bookkeeping costs at scale: listing, rank filtering, resume checks and status.

No model and no GPU: this measures the parts of a run that grow with the number of
shards (docs/scaling.md quotes its numbers). Prints a table and writes JSON.

    python benchmarks/scaling_costs.py --shards 100000 --parts 10000 --out scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dvl_batch.inspect import collect_status
from dvl_batch.records import Shard
from dvl_batch.runtime.feed import ShardFeed
from dvl_batch.runtime.job import shard_owner
from dvl_batch.runtime.resume import trusted_parts
from dvl_batch.sink.files import atomic_write_bytes, atomic_write_json
from dvl_batch.sink.output import OutputDir
from dvl_batch.sink.parts import METADATA_KEY, PART_SCHEMA
from dvl_batch.sources import FolderManifest, discover_shards

FINGERPRINT = "0123456789abcdef"


def timed(results: dict, name: str, fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    results[name] = round(time.perf_counter() - started, 3)
    return value


def make_empty_shards(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"shard-{i:06d}.tar").touch()


def make_parts(out: Path, n: int, rows_per_part: int) -> None:
    """Small real parts with the sink's schema and metadata, as status reads them."""
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    columns = {name: [None] * rows_per_part for name in PART_SCHEMA.names}
    columns.update(key=[f"k{i}" for i in range(rows_per_part)], sample_index=list(range(rows_per_part)),
                   question_index=[0] * rows_per_part, finish_reason=["stop"] * rows_per_part)
    table = pa.table(columns, schema=PART_SCHEMA)
    for i in range(n):
        meta = {"job": {"model": "x", "fingerprint": FINGERPRINT}, "shard": {"id": f"p{i}", "rows": rows_per_part, "errors": 0, "partial": False}}
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}),
                       parts / f"p{i:06d}.parquet")
    atomic_write_json(out / "job.json", {"model": "x", "spec": {"prompt": {"task": "caption"}}})


def manifest_cost(root: Path, images: int, shard_size: int, results: dict) -> None:
    """A plain-folder input pins every file name in OUT/folder_shards.json."""
    names = [f"dir{i // 10000:04d}/img{i:09d}.jpg" for i in range(images)]
    chunks = [{"id": f"photos-abc-{c:06d}", "members": names[s : s + shard_size]}
              for c, s in enumerate(range(0, images, shard_size))]
    manifest = FolderManifest(root / "folder_shards.json")
    manifest.data = {"/data/photos": chunks}
    manifest.changed = True
    timed(results, f"manifest_save_{images}_images_s", manifest.save, atomic_write_bytes)
    results[f"manifest_bytes_{images}_images"] = (root / "folder_shards.json").stat().st_size
    timed(results, f"manifest_load_{images}_images_s", FolderManifest, root / "folder_shards.json")


def decode_cost(results: dict, repeats: int) -> None:
    """Decoder work per image (read, decode, resize+pad, tokenize) on one core, on the example photos."""
    from dvl_batch.api import default_cache_dir
    from dvl_batch.config.spec import build_job_spec
    from dvl_batch.preprocess.preparer import SamplePreparer
    from dvl_batch.records import RawSample, Shard
    from dvl_batch.tiny import ensure_tiny_model

    images = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.[jp][pn]g"))
    preparer = SamplePreparer(build_job_spec({}, {"model.name": "tiny"}), str(ensure_tiny_model(default_cache_dir())))
    shard = Shard("bench", "", "folder")
    blobs = [p.read_bytes() for p in images]
    started = time.perf_counter()
    for _ in range(repeats):
        for i, blob in enumerate(blobs):
            preparer.prepare(RawSample(key=str(i), index=i, images=[blob]), shard)
    per_image = (time.perf_counter() - started) / (repeats * len(blobs))
    results["decode_ms_per_image_one_core"] = round(per_image * 1000, 2)
    results["decoder_cores_for_150_img_s"] = round(150 * per_image, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100_000, help="input shards to list")
    parser.add_argument("--parts", type=int, default=10_000, help="finished parts for status (extrapolate linearly)")
    parser.add_argument("--rows-per-part", type=int, default=1000)
    parser.add_argument("--manifest-images", type=int, default=1_000_000)
    parser.add_argument("--decode-repeats", type=int, default=30, help="passes over the example photos (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("scaling_costs.json"))
    args = parser.parse_args()
    results: dict = {"shards": args.shards, "parts": args.parts, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        timed(results, "create_empty_tars_s", make_empty_shards, root / "in", args.shards)
        shards = timed(results, "discover_folder_s", discover_shards, [str(root / "in")], 1000)
        pattern = str(root / "in" / f"shard-{{000000..{args.shards - 1:06d}}}.tar")
        timed(results, "discover_brace_pattern_s", discover_shards, [pattern], 1000)
        timed(results, "rank_filter_world_64_s", lambda: [s for s in shards if shard_owner(s.id, 64) == 0])
        feed = ShardFeed(shards)
        blob = timed(results, "pickle_shard_list_s", pickle.dumps, feed.shards)
        results["shard_list_pickle_bytes"] = len(blob)

        out = root / "out"
        timed(results, "create_parts_s", make_parts, out, args.parts, args.rows_per_part)
        output = OutputDir(out)
        timed(results, "done_shards_listing_s", output.done_shards)
        status = timed(results, "status_s", collect_status, out)
        assert status["shards_done"] == args.parts
        mine = [Shard(f"p{i:06d}", f"/in/p{i:06d}.tar", "webdataset") for i in range(args.parts)]
        done, _ = timed(results, "verify_parts_first_start_s", trusted_parts, output, mine, FINGERPRINT)
        assert len(done) == args.parts
        done, _ = timed(results, "verify_parts_next_start_s", trusted_parts, output, mine, FINGERPRINT)
        assert len(done) == args.parts
        manifest_cost(root, args.manifest_images, 1000, results)
    if args.decode_repeats:
        decode_cost(results, args.decode_repeats)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
