"""Read-only views for `dvl-batch inspect` (inputs) and `dvl-batch status` (outputs).

Neither loads a model: inspect reads shards the way a run would and reports what it
finds; status reads job.json, progress files and part footers (no row data).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .records import RawSample, Shard, ShardEnd
from .sink.checkpoints import count_rows
from .sink.locks import RunLock
from .sink.parts import read_part_info
from .sources import FolderManifest, discover_shards, read_shard


@dataclass
class ShardReport:
    shard: Shard
    samples: int = 0
    errors: int = 0
    partial: bool = False
    message: str | None = None
    fields: Counter = field(default_factory=Counter)
    image_fields: Counter = field(default_factory=Counter)


def inspect_shard(shard: Shard, image_field: str | None = None, key_field: str | None = None) -> ShardReport:
    report = ShardReport(shard)
    for item in read_shard(shard, image_field, key_field):
        if isinstance(item, ShardEnd):
            report.partial, report.message = item.partial, item.message
            continue
        assert isinstance(item, RawSample)
        report.samples += 1
        report.errors += item.error is not None
        report.fields.update(item.field_names)
        report.image_fields.update(item.image_names)
    return report


def inspect_inputs(inputs: list[str], image_field: str | None, key_field: str | None, shard_size: int, max_shards: int | None):
    shards = discover_shards(inputs, shard_size, FolderManifest(None))
    chosen = shards if max_shards is None else shards[:max_shards]
    return shards, [inspect_shard(s, image_field, key_field) for s in chosen]


def collect_status(out: Path) -> dict[str, Any]:
    """Shards done/total, rows, errors and throughput of an output folder."""
    out = Path(out)
    job_file = out / "job.json"
    if not job_file.exists():
        raise UsageError(f"{out} is not a dvl-batch output folder (no job.json)")
    job = json.loads(job_file.read_text())
    parts = sorted((out / "parts").glob("*.parquet"))
    rows = errors = partial = 0
    for part in parts:
        info = read_part_info(part)
        rows += info.get("rows", 0)
        errors += info.get("errors", 0)
        partial += bool(info.get("partial"))
    progress = current_world(json.loads(p.read_text()) for p in sorted(out.glob("progress*.json")))
    world_size = progress[0].get("world_size", 1) if progress else 1
    for record in progress:
        mark_dead_runs(out, record)
    checkpoint_files, checkpoint_rows = count_rows(out)
    total = sum(p.get("shards_total", 0) for p in progress) if len(progress) == world_size else None
    return {
        "output": str(out),
        "model": job.get("model"),
        "task": job.get("spec", {}).get("prompt", {}).get("task"),
        "shards_done": len(parts),
        "shards_total": total,
        "partial_shards": partial,
        "rows": rows,
        "error_rows": errors,
        "checkpoint_files": checkpoint_files,  # rows of shards in progress, folded into their parts when they finish
        "checkpoint_rows": checkpoint_rows,
        "world_size": world_size,
        "ranks_reporting": len(progress),
        "runs": progress,
    }


def mark_dead_runs(out: Path, record: dict[str, Any]) -> None:
    """A progress file says "running" until its run ends; a run killed with -9 never says otherwise.
    The run's lock tells: the kernel drops it when its process dies."""
    if record.get("state") != "running":
        return
    world = record.get("world_size", 1) or 1
    suffix = "" if world == 1 else f"-rank{record.get('rank', 0)}of{world}"
    holder = RunLock(out / f".lock{suffix}").holder()
    record["alive"] = holder is not None
    if holder is None:
        record["state"] = "not running (the run ended without saying so: killed or crashed)"


def current_world(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The progress records of the latest world: one per rank, ordered by rank.

    Ranks of one `--world-size` each keep a progress file; files left by earlier runs
    with another world size (or by a single run) are not part of the current picture.
    """
    records = list(records)
    if not records:
        return []
    latest = max(records, key=lambda r: str(r.get("updated", "")))
    world = latest.get("world_size", 1)
    mine = [r for r in records if r.get("world_size", 1) == world]
    return sorted(mine, key=lambda r: r.get("rank", 0))
