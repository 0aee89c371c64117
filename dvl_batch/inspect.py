"""Read-only views for `dvl-batch inspect` (inputs) and `dvl-batch status` (outputs).

Neither loads a model: inspect reads shards the way a run would and reports what it
finds; status reads job.json, progress files and part footers (no row data).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .records import RawSample, Shard, ShardEnd
from .sink.checkpoints import count_rows
from .sink.locks import RunLock
from .sink.verify import part_record, read_state_file
from .sources import FolderManifest, discover_shards, read_shard


@dataclass
class ShardReport:
    shard: Shard
    samples: int = 0
    errors: int = 0
    partial: bool = False
    message: str | None = None
    duplicate_keys: int = 0
    fields: Counter = field(default_factory=Counter)
    image_fields: Counter = field(default_factory=Counter)


def inspect_shard(shard: Shard, image_field: str | None = None, key_field: str | None = None) -> ShardReport:
    report = ShardReport(shard)
    for item in read_shard(shard, image_field, key_field):
        if isinstance(item, ShardEnd):
            report.partial, report.message, report.duplicate_keys = item.partial, item.message, item.duplicate_keys
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
    """Shards done/total, rows, errors and throughput of an output folder.

    A part that does not read back is counted (and named) as unreadable, not trusted; a
    job.json or progress file that does not parse, or holds values of the wrong types, is
    one UsageError line saying what to do. A deleted job.json (safe: the next run rebuilds
    it) is no reason to refuse: the parts' own job records name the model and task.
    """
    try:
        return _collect_status(Path(out))
    except (TypeError, AttributeError, KeyError) as exc:  # valid JSON, wrong shapes (edited by hand?)
        raise UsageError(f"{out}: job.json or a progress file holds values of the wrong type ({exc}); delete "
                         "progress*.json (the next run writes them again) or job.json (rebuilt from OUT/parts)") from None


def _collect_status(out: Path) -> dict[str, Any]:
    job_file = out / "job.json"
    job: dict[str, Any] | None = None
    if job_file.exists():
        job = read_state_file(job_file, "delete it and rerun the job's command: it is rebuilt from OUT/parts")
        if not isinstance(job, dict):
            raise UsageError(f"{job_file} is corrupt (not a JSON object); delete it and rerun the job's command")
    parts = sorted((out / "parts").glob("*.parquet"))
    rows = errors = partial = duplicates = 0
    unreadable: list[str] = []
    part_job: dict[str, Any] = {}  # the job record of the first part that reads back
    for part in parts:
        try:
            record = part_record(part)
        except (OSError, ValueError) as exc:
            unreadable.append(f"{part.name}: {exc}")
            continue
        info, part_job = record["shard"], part_job or record.get("job") or {}
        rows += info.get("rows", 0)
        errors += info.get("errors", 0)
        partial += bool(info.get("partial"))
        duplicates += int(info.get("duplicate_keys") or 0)
    fix = "delete it: the next run writes it again"
    progress = current_world(read_state_file(p, fix) for p in sorted(out.glob("progress*.json")))
    world_size = progress[0].get("world_size", 1) if progress else 1
    for record in progress:
        mark_dead_runs(out, record)
    checkpoint_files, checkpoint_rows = count_rows(out)
    total = sum(p.get("shards_total", 0) for p in progress) if len(progress) == world_size else None
    notes = []
    if job is None:  # deleted (the README says that is safe): the parts and progress files still tell
        if not (parts or progress or checkpoint_files):
            raise UsageError(f"{out} is not a dvl-batch output folder (no job.json, parts, checkpoints or progress files)")
        job = {"model": part_job.get("model") or (progress[0].get("model") if progress else None),
               "spec": {"prompt": {"task": part_job.get("task")}}}
        if part_job:
            notes.append("no job.json: model and task come from the parts; the next run of the job's command writes it again")
        else:
            known = "the model comes from the progress file, the task is" if job["model"] else "model and task are"
            notes.append(f"no job.json and no finished part: {known} unknown until the next run writes job.json again")
    return {
        "output": str(out),
        "notes": notes,
        "model": job.get("model"),
        "task": job.get("spec", {}).get("prompt", {}).get("task"),
        "shards_done": len(parts) - len(unreadable),
        "shards_total": total,
        "partial_shards": partial,
        "unreadable_parts": unreadable,
        "duplicate_keys": duplicates,
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
    records = [r for r in records if isinstance(r, dict)]
    if not records:
        return []
    latest = max(records, key=lambda r: str(r.get("updated", "")))
    world = latest.get("world_size", 1)
    mine = [r for r in records if r.get("world_size", 1) == world]
    return sorted(mine, key=lambda r: r.get("rank", 0))
