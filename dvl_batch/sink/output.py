"""The output folder: OUT's layout, its locks, job.json and the cleanup of dead writers' files.

A run killed at any moment leaves either a complete part or nothing, so a rerun redoes
at most the shards that were in flight and never writes a row twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .checkpoints import CHECKPOINT_DIR, Checkpoints
from .files import atomic_write_json, explain_os_error
from .locks import RunLock, WorldLock
from .verify import read_state_file


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
        self.verified_file = self.root / f".verified_parts{suffix}.json"  # sink/verify.py: VerifiedParts

    def prepare(self, owns: Callable[[str], bool] | None = None) -> None:
        """Create OUT, take the locks, and clear temp files a killed run left behind.

        `owns(shard_id)` says which shards this rank owns (needed when world_size > 1).
        """
        taken = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if taken is not None and not taken.is_dir():  # a path the user can fix, not a failed write
            raise UsageError(f"output {self.root}: {taken} is a file, not a folder; choose another --output")
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise explain_os_error(exc, self.parts / "x") from exc
        with self.shared_lock():
            self.world_lock.acquire()
        try:
            self.lock.acquire()
        except BaseException:
            self.world_lock.release()
            raise
        self.remove_stale_temp(owns)

    def refuse_if_locked(self) -> None:
        """Raise LockHeldError when another run holds this rank's lock; creates nothing, imports nothing heavy.

        The world-size check needs OUT/.job.lock held, so it stays in `prepare`.
        """
        if self.root.is_dir():
            self.lock.probe()

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
        if self.world_size == 1 or owns is not None:  # checkpoints of finished shards, half-written checkpoints
            Checkpoints(self.root).remove_stale(self.done_shards(), None if self.world_size == 1 else owns)
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
            previous = read_state_file(
                self.job_file, "delete it and rerun the same command: the job's identity is rebuilt from OUT/parts"
            )
            if not isinstance(previous, dict):
                raise UsageError(f"{self.job_file} is corrupt (not a JSON object); delete it and rerun the same command")
            if previous.get("fingerprint") == job_record["fingerprint"]:
                if _same_questions_file(previous, job_record):
                    digest = job_record.get("questions_file_sha256")
                    if digest and "questions_file_sha256" not in previous:  # a job.json from before the digest
                        atomic_write_json(self.job_file, {**previous, "questions_file_sha256": digest})
                    return
                if not overwrite:
                    raise UsageError(
                        f"the questions file {job_record['spec']['prompt']['questions_file']} changed since the job in "
                        f"{self.root} started (its questions are part of the job); restore it to resume, use "
                        "--overwrite to discard the results, or pick another output folder"
                    )
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
        for part in [*self.parts.glob("*.parquet"), *(self.root / CHECKPOINT_DIR).glob("*.jsonl")]:
            part.unlink()
        for path in [self.job_file, self.manifest_file, *self.root.glob("progress*.json"),
                     *self.root.glob(".verified_parts*.json")]:
            path.unlink(missing_ok=True)

    def write_progress(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.progress_file, record)


def _plain(value: Any) -> Any:
    """A setting as job.json stores it: tuples as lists, so a value read back compares equal."""
    return json.loads(json.dumps(value, default=str))


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Each changed setting as `name old -> new`, e.g. `generation.max_new_tokens 6 -> 8`."""
    before, after = _flatten(_plain(old)), _flatten(_plain(new))
    changed = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    if not changed:
        return "different settings"
    return "changed: " + "; ".join(f"{key} {_shown(before.get(key))} -> {_shown(after.get(key))}" for key in changed)


def _same_questions_file(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the questions file reads as it did (a job.json without the digest cannot tell: same)."""
    before, now = previous.get("questions_file_sha256"), current.get("questions_file_sha256")
    return before is None or now is None or before == now
