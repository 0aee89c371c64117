"""Sink: one parquet part per shard, written atomically, plus the job's bookkeeping.

The part file *is* the checkpoint: a shard is done exactly when
`OUT/parts/<shard>.parquet` exists, and it only ever appears whole (written to a
temporary name, fsynced, renamed, directory fsynced). A run killed at any moment
leaves either the complete part or nothing, so a rerun redoes at most the shards
that were in flight and never writes a row twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import LockHeldError, OutputError, UsageError
from .sources import Shard, ShardEnd

METADATA_KEY = b"dvl_batch"
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


@dataclass
class AnswerRow:
    """One output row: the answer to one question about one sample (or why there is none)."""

    key: str
    shard: str
    sample_index: int
    question_index: int
    question: str
    answer: str | None
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    error: str | None = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _explain(exc: OSError, path: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device holding {path.parent}; free space and rerun to resume")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write to {path.parent}: {exc.strerror}")
    return OutputError(f"writing {path} failed: {exc.strerror or exc}")


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a whole file or nothing: `write(handle)` to a temp name, fsync, rename, fsync
    the folder. A failure (disk full, read-only) becomes a one-line OutputError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _explain(exc, path) from exc
    except BaseException:  # a second Ctrl-C mid-write: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


class RunLock:
    """An exclusive POSIX record lock (fcntl) on a file in OUT.

    The kernel drops it when the owning process dies, so a lock left by a SIGKILLed
    run is harmless: the next run acquires it. Unlike flock, a record lock belongs
    to the process, not the file descriptor, so forked decoder workers that outlive
    a killed parent for a few seconds do not keep holding it. The file also records
    who holds it, for the error message of a second run.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = False) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _explain(exc, self.path) from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LockHeldError(f"another dvl-batch run holds {self.path.parent} ({holder}); exiting") from None
        self.fd = fd
        try:  # who holds it, for the message of a second run; the lock itself is what counts
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class WorldLock:
    """Lets the ranks of one `--world-size` share OUT and refuses runs with another.

    Each rank has its own exclusive lock, so ranks of one world never collide. A run
    with a different world size would assign shards differently and redo (or fight
    over) shards another rank owns. Every run therefore holds a shared record lock on
    byte `world_size` of `OUT/.world.lock` and, once, checks that nobody holds any
    other byte. The check briefly locks the other bytes itself, so runs must check one
    at a time (OutputDir.prepare does it under OUT/.job.lock): otherwise two ranks
    starting together could mistake each other's check for another world.
    """

    def __init__(self, path: Path, world_size: int):
        self.path, self.world_size = path, world_size
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _explain(exc, self.path) from exc
        w = self.world_size
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, w)
            for length, start in ((w, 0), (0, w + 1)):  # every byte but ours; length 0 = to the end
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
        except (BlockingIOError, PermissionError):
            os.close(fd)  # drops our shared byte too
            raise LockHeldError(
                f"{self.path.parent} is in use by a dvl-batch run with a different --world-size; "
                "wait for it or use another output folder"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class OutputDir:
    """Layout of OUT: job.json, parts/, progress files, locks, the folder manifest."""

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1):
        self.root = Path(path)
        self.rank, self.world_size = rank, world_size
        self.parts = self.root / "parts"
        self.job_file = self.root / "job.json"
        self.manifest_file = self.root / "folder_shards.json"
        suffix = "" if world_size == 1 else f"-rank{rank}of{world_size}"
        self.lock = RunLock(self.root / f".lock{suffix}")
        self.world_lock = WorldLock(self.root / ".world.lock", world_size)
        self.progress_file = self.root / f"progress{suffix}.json"

    def prepare(self, owns: Callable[[str], bool] | None = None) -> None:
        """Create OUT, take the locks, and clear temp files a killed run left behind.

        `owns(shard_id)` says which shards this rank owns (needed when world_size > 1).
        """
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _explain(exc, self.parts / "x") from exc
        with self.shared_lock():
            self.world_lock.acquire()
        try:
            self.lock.acquire()
        except BaseException:
            self.world_lock.release()
            raise
        self.remove_stale_temp(owns)

    def release(self) -> None:
        self.lock.release()
        self.world_lock.release()

    def remove_stale_temp(self, owns: Callable[[str], bool] | None = None) -> int:
        """Delete half-written files of dead writers; returns how many.

        Only the holder of a shard's rank lock (and the engine processes or actors it
        runs) ever writes that shard, so while we hold it every temp file of a shard we
        own is stale. Other ranks' temp files may be live: they are left alone. Temp
        files of OUT's own bookkeeping (job.json, progress) are stale once we hold the
        lock in a single-rank run.
        """
        removed = 0
        for stale in self.parts.glob(".*.tmp-*"):
            shard_id = stale.name[1:].split(".parquet.tmp-", 1)[0]
            if self.world_size == 1 or (owns is not None and owns(shard_id)):
                stale.unlink(missing_ok=True)
                removed += 1
        if self.world_size == 1:
            for stale in self.root.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
                removed += 1
        return removed

    def shared_lock(self) -> RunLock:
        """A short-lived lock all ranks take around job.json and the folder manifest."""
        return RunLock(self.root / ".job.lock")

    def part_path(self, shard_id: str) -> Path:
        return self.parts / f"{shard_id}.parquet"

    def done_shards(self) -> set[str]:
        return {p.stem for p in self.parts.glob("*.parquet") if not p.name.startswith(".")}

    def check_job(self, job_record: dict[str, Any], overwrite: bool) -> None:
        """Refuse to mix outputs of different settings in one OUT, unless told to start over."""
        if self.job_file.exists():
            previous = json.loads(self.job_file.read_text())
            if previous.get("fingerprint") == job_record["fingerprint"]:
                return
            if not overwrite:
                diffs = describe_differences(previous.get("identity", {}), job_record["identity"])
                raise UsageError(
                    f"{self.root} holds results of a different job ({diffs}); rerun with the same settings "
                    "to resume, use --overwrite to discard them, or pick another output folder"
                )
            self.clear()
        elif overwrite:
            self.clear()
        atomic_write_json(self.job_file, job_record)

    def clear(self) -> None:
        """Delete this tool's results in OUT (parts, job.json, progress, manifest) and nothing else."""
        if self.world_size > 1 and (self.job_file.exists() or self.done_shards()):
            raise UsageError("--overwrite cannot be combined with --world-size; clear OUT with one run first")
        for part in self.parts.glob("*.parquet"):
            part.unlink()
        for path in [self.job_file, self.manifest_file, *self.root.glob("progress*.json")]:
            path.unlink(missing_ok=True)

    def write_progress(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.progress_file, record)

    def remove_tree(self) -> None:
        shutil.rmtree(self.root)


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return "different " + ", ".join(changed) if changed else "different settings"


class ParquetSink:
    """Writes the rows of one finished shard as one atomic parquet part."""

    def __init__(self, out: OutputDir, job_metadata: dict[str, Any]):
        self.out = out
        self.job_metadata = job_metadata

    def write(self, shard: Shard, end: ShardEnd | None, rows: list[AnswerRow], note: str | None = None) -> Path:
        rows = sorted(rows, key=lambda r: (r.sample_index, r.question_index))
        columns = {name: [getattr(r, name) for r in rows] for name in PART_SCHEMA.names}
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
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "writer": f"{socket.gethostname()}:{os.getpid()}",  # which engine process or actor wrote it
        }
        meta = {METADATA_KEY: json.dumps({"job": self.job_metadata, "shard": shard_meta}).encode()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
        path = self.out.part_path(shard.id)
        atomic_write(path, lambda handle: pq.write_table(table, handle, compression="zstd"))
        return path


def read_part_info(path: Path) -> dict[str, Any]:
    """The shard record a part carries in its schema metadata (footer only, no data read)."""
    meta = pq.read_schema(path).metadata or {}
    blob = meta.get(METADATA_KEY)
    info = json.loads(blob)["shard"] if blob else {}
    if "rows" not in info:
        info["rows"] = pq.ParquetFile(path).metadata.num_rows
    return info
