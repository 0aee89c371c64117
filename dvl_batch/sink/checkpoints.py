"""Checkpoints: the answered rows of shards still in progress, saved while they are answered.

A shard's part appears only once its last sample is answered. So that a kill loses at
most a few seconds of work, not a whole shard, the rows of every *whole* sample (all
its questions answered) are flushed at least every `output.checkpoint_seconds` to
`OUT/checkpoints/<shard>.ckpt<N>.jsonl` (one row per line, the part's columns; each
file written atomically like a part). Plain JSON, written without pyarrow, because a
timer thread writes them while decoder processes may be forked. A resumed run skips the samples its shard's checkpoints hold;
when the shard completes, its checkpoints are folded into its one part and removed.
Checkpoint files are internal: readers use the parts.

Each file's first line says whose rows these are: the job's fingerprint and the shard's
source as it was read (size and modification time of a local file; names, sizes and times
of a folder chunk's images). Rows are matched to samples by index alone, so a resumed run
must not trust a checkpoint of another job (job.json deleted) or of a shard file since
rewritten: the first is refused, the second's samples are answered again
(runtime/job.py `with_checkpoints`). Files from before this header are trusted as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections import defaultdict
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..records import AnswerRow, Shard
from .files import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^(?P<shard>.+)\.ckpt(?P<seq>\d+)\.jsonl$")


class Checkpoints:
    """The checkpoint files of one OUT, by shard."""

    def __init__(self, root: Path, fingerprint: str | None = None):
        self.folder = Path(root) / CHECKPOINT_DIR
        self.fingerprint = fingerprint

    def scan(self) -> dict[str, list[Path]]:
        """{shard id: its checkpoint files, oldest first}."""
        found: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                match = _NAME.match(path.name)
                if match and _is_regular(path):  # a FIFO or folder of that name is never opened
                    found[match["shard"]].append((int(match["seq"]), path))
        return {shard: [p for _, p in sorted(files)] for shard, files in found.items()}

    def files(self, shard_id: str) -> list[Path]:
        return self.scan().get(shard_id, [])

    def write(self, shard_id: str, seq: int, rows: list[AnswerRow], source: str | None = None) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{shard_id}.ckpt{seq:06d}.jsonl"
        header = json.dumps({HEADER: {"fingerprint": self.fingerprint, "source": source}}) + "\n"
        atomic_write_bytes(path, (header + "".join(json.dumps(asdict(row)) + "\n" for row in rows)).encode())
        return path

    @staticmethod
    def header(path: Path) -> dict[str, Any]:
        """Whose rows a checkpoint holds ({"fingerprint", "source"}); {} for a file without a header."""
        with open(path, "rb") as handle:
            first = json.loads(handle.readline() or b"{}")
        found = first.get(HEADER) if isinstance(first, dict) else None
        return found if isinstance(found, dict) else {}

    def read_rows(self, paths: list[Path]) -> list[AnswerRow]:
        return [AnswerRow(**record) for path in paths for record in _read(path)]

    def done_samples(self, paths: list[Path]) -> dict[int, str]:
        """{sample index: key} of the samples a shard's checkpoints hold (whole samples only);
        ValueError for a file whose rows are not AnswerRows (hand-edited, another version's)."""
        done: dict[int, str] = {}
        for path in paths:
            for record in _read(path):
                if set(record) != ROW_FIELDS or not all(
                    isinstance(record[name], int) and not isinstance(record[name], bool) and record[name] >= 0
                    for name in ("sample_index", "question_index")
                ):
                    raise ValueError(f"{path.name}: not a checkpoint row: {sorted(record)[:12]}")
                done[record["sample_index"]] = str(record["key"])
        return done

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def remove_stale(self, done: set[str], owns: Any = None) -> None:
        """Checkpoints of shards whose part exists (a kill between the fold and the clean-up), and temp files."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            shard = path.name[1:].split(".ckpt", 1)[0] if path.name.startswith(".") else None
            match = _NAME.match(path.name)
            shard = shard or (match["shard"] if match else None)
            if shard is None or (owns is not None and not owns(shard)):
                continue
            if path.name.startswith(".") or shard in done:
                path.unlink(missing_ok=True)


HEADER = "dvl_batch_checkpoint"
ROW_FIELDS = frozenset(f.name for f in fields(AnswerRow))


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _read(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if HEADER not in r]


def source_signature(shard: Shard) -> str | None:
    """What a shard's input looked like when it was read: local file size and mtime, or for a
    folder chunk a digest of its images' names, sizes and mtimes; None where it cannot be told
    (pipe: and URL shards, a file that cannot be stat'ed)."""
    try:
        if shard.format == "folder":
            digest = hashlib.sha1()
            for member in shard.members:
                stat = os.stat(os.path.join(shard.url, member))
                digest.update(f"{member}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(errors="surrogateescape"))
            return f"folder:{digest.hexdigest()}"
        if "://" in shard.url or shard.url.startswith("pipe:"):
            return None
        stat = os.stat(shard.url)
        return f"file:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        return None


def count_rows(root: Path) -> tuple[int, int]:
    """(checkpoint files, rows in them) of OUT; for `status`."""
    files = rows = 0
    for paths in Checkpoints(root).scan().values():
        for path in paths:
            files += 1
            with open(path, "rb") as handle:
                rows += sum(1 for line in handle if line.strip() and not line.startswith(b'{"' + HEADER.encode()))
    return files, rows
