"""Checkpoints: the answered rows of shards still in progress, saved while they are answered.

A shard's part appears only once its last sample is answered. So that a kill loses at
most a few seconds of work, not a whole shard, the rows of every *whole* sample (all
its questions answered) are flushed at least every `output.checkpoint_seconds` to
`OUT/checkpoints/<shard>.ckpt<N>.jsonl` (one row per line, the part's columns; each
file written atomically like a part). Plain JSON, written without pyarrow, because a
timer thread writes them while decoder processes may be forked. A resumed run skips the samples its shard's checkpoints hold;
when the shard completes, its checkpoints are folded into its one part and removed.
Checkpoint files are internal: readers use the parts.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..records import AnswerRow
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
                if match:
                    found[match["shard"]].append((int(match["seq"]), path))
        return {shard: [p for _, p in sorted(files)] for shard, files in found.items()}

    def files(self, shard_id: str) -> list[Path]:
        return self.scan().get(shard_id, [])

    def write(self, shard_id: str, seq: int, rows: list[AnswerRow]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{shard_id}.ckpt{seq:06d}.jsonl"
        atomic_write_bytes(path, "".join(json.dumps(asdict(row)) + "\n" for row in rows).encode())
        return path

    def read_rows(self, paths: list[Path]) -> list[AnswerRow]:
        return [AnswerRow(**record) for path in paths for record in _read(path)]

    def done_samples(self, paths: list[Path]) -> frozenset[int]:
        """Sample indices held by a shard's checkpoints (each holds whole samples only)."""
        return frozenset(record["sample_index"] for path in paths for record in _read(path))

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


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_rows(root: Path) -> tuple[int, int]:
    """(checkpoint files, rows in them) of OUT; for `status`."""
    files = rows = 0
    for paths in Checkpoints(root).scan().values():
        for path in paths:
            files += 1
            with open(path, "rb") as handle:
                rows += sum(1 for line in handle if line.strip())
    return files, rows
