"""Parts: the rows of one finished shard as one parquet file, written atomically.

A shard is done exactly when `OUT/parts/<shard>.parquet` exists, and it only ever
appears whole; the rows saved in the shard's checkpoints (checkpoints.py) are folded
into it. Its footer carries the job's and the shard's record, so `status` reads
footers, never row data.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..records import AnswerRow, Shard, ShardEnd
from .checkpoints import Checkpoints
from .files import atomic_write
from .output import OutputDir
from .verify import METADATA_KEY, part_record

PART_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("sample_index", pa.int64()),
        ("question_index", pa.int32()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("generated_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
    ]
)


def _whole_samples(batches: list[list[AnswerRow]]) -> list[AnswerRow]:
    """Rows of `batches` (checkpoint files oldest first, then this run's rows), where a sample
    found again in a later batch (answered again: its shard changed) is replaced as a whole:
    its new answer may have fewer questions than the old one."""
    samples: dict[int, dict[int, AnswerRow]] = {}
    for batch in batches:
        fresh: dict[int, dict[int, AnswerRow]] = {}
        for row in batch:
            fresh.setdefault(row.sample_index, {})[row.question_index] = row
        samples.update(fresh)
    return [samples[s][q] for s in sorted(samples) for q in sorted(samples[s])]


class ParquetSink:
    """Writes the rows of one finished shard as one atomic parquet part."""

    def __init__(self, out: OutputDir, job_metadata: dict[str, Any]):
        self.out = out
        self.job_metadata = job_metadata
        self.checkpoints = Checkpoints(out.root, job_metadata.get("fingerprint"))

    def write(self, shard: Shard, end: ShardEnd | None, rows: list[AnswerRow], note: str | None = None,
              checkpoints: list[Path] | tuple[Path, ...] = ()) -> Path:
        """The shard's part: `rows` plus those of its `checkpoints`, which are removed once the part exists."""
        rows = _whole_samples([*(self.checkpoints.read_rows([p]) for p in checkpoints), rows])
        if end is not None and not end.partial:  # a sample the whole shard does not have: a stale row
            rows = [r for r in rows if r.sample_index < end.n_samples]
        columns = {name: [_storable(getattr(r, name)) for r in rows] for name in PART_SCHEMA.names}
        table = pa.table(columns, schema=PART_SCHEMA)
        shard_meta = {
            "id": shard.id,
            "url": shard.url,
            "format": shard.format,
            "samples": end.n_samples if end else None,
            "partial": bool(end.partial) if end else True,
            "message": (end.message if end else None) or note,
            "rows": len(rows),
            "errors": sum(1 for r in rows if r.error),
            "duplicate_keys": end.duplicate_keys if end else 0,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "writer": f"{socket.gethostname()}:{os.getpid()}",  # which engine process or actor wrote it
        }
        meta = {METADATA_KEY: json.dumps({"job": self.job_metadata, "shard": shard_meta}).encode()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
        path = self.out.part_path(shard.id)
        atomic_write(path, lambda handle: pq.write_table(table, handle, compression="zstd"))
        self.checkpoints.remove(list(checkpoints))
        return path


def _storable(value: Any) -> Any:
    """Text parquet can store: lone surrogates (undecodable file-name bytes) become `\\xNN`."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def error_rows(out: Path) -> int:
    """Rows with an error in every part of OUT (earlier runs' parts too), from the footers
    (a part that does not read back counts for nothing here; the next run redoes it)."""
    total = 0
    for path in sorted((Path(out) / "parts").glob("*.parquet")):
        try:
            total += int(part_record(path)["shard"].get("errors") or 0)
        except (OSError, ValueError):  # a part that does not read back (part_record says why)
            continue
    return total
