"""What a rerun may trust in OUT: parts that read back and belong to the job, state files that parse.

A part is only "done" when its footer reads back, its schema is the part schema, its
row count is the one its record states, and its job record carries the job's
fingerprint. Anything else (truncated by hand, half-copied, another job's) is redone.
Only footers are read, never row data, and a part verified by an earlier start is not
read again while its size and modification time are unchanged (`VerifiedParts`): at
100k parts, reading every footer took 16-25 s of every start of a cron job.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import OutputError, UsageError
from .files import atomic_write_bytes

METADATA_KEY = b"dvl_batch"


def part_record(path: Path) -> dict[str, Any]:
    """{"job": ..., "shard": ...} from a part's footer; ValueError/OSError if it does not read back."""
    import pyarrow.parquet as pq

    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open for ever
        raise ValueError("is not a regular file")
    try:
        meta = pq.ParquetFile(path).metadata
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid for a cut or garbled file
        raise ValueError(f"does not read back as parquet ({str(exc).splitlines()[0]})") from None
    blob = (meta.metadata or {}).get(METADATA_KEY)
    if not blob:
        raise ValueError("has no dvl_batch record in its footer")
    try:
        record = json.loads(blob)
    except ValueError:
        raise ValueError("has a garbled dvl_batch record") from None
    shard = record.get("shard") or {}
    if "rows" in shard and shard["rows"] != meta.num_rows:
        raise ValueError(f"holds {meta.num_rows} rows, its record says {shard['rows']}")
    if "key" not in meta.schema.to_arrow_schema().names:
        raise ValueError("is not a dvl-batch part (no key column)")
    record.setdefault("shard", {}).setdefault("rows", meta.num_rows)
    return record


def untrusted_reason(path: Path, fingerprint: str) -> str | None:
    """Why the part at `path` is not a finished shard of the job `fingerprint`, or None if it is."""
    try:
        record = part_record(path)
    except (OSError, ValueError) as exc:
        return str(exc)
    found = (record.get("job") or {}).get("fingerprint")
    if found != fingerprint:
        return f"was written by another job (fingerprint {found}, this job {fingerprint})"
    return None


def read_state_file(path: Path, fix: str) -> Any:
    """A JSON state file of OUT, or one UsageError line that says how to fix it."""
    try:
        text = path.read_text()
    except OSError as exc:  # unreadable is not corrupt: deleting it would be the wrong fix
        raise UsageError(f"cannot read {path} ({exc.strerror or exc}); it must be a readable file") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path} is corrupt ({str(exc).splitlines()[0]}); {fix}") from None


class VerifiedParts:
    """Parts an earlier start verified, keyed by name with their (size, mtime) and job.

    A part whose size or modification time changed since (cut, copied over, rewritten)
    is read again, as is every part of another job; an unreadable or garbled cache is
    simply ignored: it only saves reading, it never decides on its own."""

    def __init__(self, path: Path):
        self.path = path
        self.changed = False
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        self.entries: dict[str, Any] = entries if isinstance(entries, dict) else {}

    def untrusted_reason(self, part: Path, fingerprint: str) -> str | None:
        """As `untrusted_reason`, reading the footer only when the part is new or changed."""
        try:
            info = part.stat()
        except OSError as exc:
            return str(exc)
        stamp = [info.st_size, info.st_mtime_ns]
        entry = self.entries.get(part.name)
        if isinstance(entry, dict) and entry.get("stat") == stamp and entry.get("job") == fingerprint:
            return None
        reason = untrusted_reason(part, fingerprint)
        if reason is None:
            self.entries[part.name] = {"stat": stamp, "job": fingerprint}
            self.changed = True
        elif self.entries.pop(part.name, None) is not None:
            self.changed = True
        return reason

    def prune(self, present: set[str]) -> None:
        """Forget parts that no longer exist (deleted by hand, or by --overwrite), so the cache
        does not grow with every part a job ever wrote."""
        gone = [name for name in self.entries if name not in present]
        for name in gone:
            del self.entries[name]
        self.changed = self.changed or bool(gone)

    def save(self) -> None:
        """Keep what was verified for the next start (best effort: a full disk costs only time)."""
        if not self.changed:
            return
        with contextlib.suppress(OutputError):  # compact: 100k parts make a ~6 MB file
            atomic_write_bytes(self.path, json.dumps(self.entries, separators=(",", ":")).encode())
        self.changed = False
