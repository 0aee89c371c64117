"""Discovery: user inputs (files, folders, brace patterns, URLs) to a de-duplicated shard list.

A shard's id is stable across runs (derived from the resolved path, not from the set
of inputs), so an incremental cron run that finds new shards next to old ones
processes only the new ones. Plain image folders are cut into chunks that a
`FolderManifest` pins, so new files never move old chunk boundaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UsageError
from ..records import Shard
from .formats import PARQUET_SUFFIXES, TAR_SUFFIXES, format_of, is_image_name, is_remote


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _path_digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "shard"



def _file_shard(path: str, fmt: str) -> Shard:
    resolved = path if is_remote(path) else str(Path(path).resolve())
    base = PurePosixPath(path.split("::")[-1]).name
    for suffix in TAR_SUFFIXES + PARQUET_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return Shard(id=f"{_safe_name(base)}-{_path_digest(resolved)}", url=resolved, format=fmt)



def _list_folder_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_name(name):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return found


class FolderManifest:
    """Remembers how plain-folder images were split into shards, so reruns stay stable.

    Folder chunks are cut from a sorted listing; if a later run cut again after new
    files appeared, chunk boundaries would move and finished images would be redone.
    The manifest pins existing chunks and puts only unseen files into new chunks.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, list[dict[str, Any]]] = {}
        if path is not None and path.exists():
            self.data = json.loads(path.read_text())
        self.changed = False

    def shards_for(self, root: Path, shard_size: int) -> list[Shard]:
        key = str(root.resolve())
        chunks = self.data.setdefault(key, [])
        assigned = {m for c in chunks for m in c["members"]}
        fresh = [name for name in _list_folder_images(root) if name not in assigned]
        stem = f"{_safe_name(root.resolve().name)}-{_path_digest(key)}"
        for start in range(0, len(fresh), shard_size):
            members = fresh[start : start + shard_size]
            chunks.append({"id": f"{stem}-{len(chunks):06d}", "members": members})
            self.changed = True
        return [Shard(id=c["id"], url=key, format="folder", members=tuple(c["members"])) for c in chunks]

    def save(self, write: Callable[[Path, bytes], None]) -> None:
        """Store new chunks with `write(path, data)` (the sink's atomic write): OUT is the sink's."""
        if self.path is None or not self.changed:
            return
        write(self.path, json.dumps(self.data).encode())
        self.changed = False


def discover_shards(inputs: tuple[str, ...] | list[str], shard_size: int, manifest: FolderManifest | None = None):
    """Expand inputs (files, dirs, brace patterns, URLs) into a de-duplicated shard list."""
    if not inputs:
        raise UsageError("no input given: pass shard files, a folder, or a pattern like 'shards/{000..009}.tar'")
    manifest = manifest or FolderManifest(None)
    shards: list[Shard] = []
    for raw in inputs:
        for item in _expand_braces(raw):
            shards.extend(_shards_of(item, shard_size, manifest))
    unique: dict[str, Shard] = {}
    for shard in shards:
        unique.setdefault(shard.id, shard)
    return list(unique.values())


def _shards_of(item: str, shard_size: int, manifest: FolderManifest) -> list[Shard]:
    if is_remote(item):
        fmt = format_of(item)
        if fmt is None:
            raise UsageError(f"cannot tell the format of {item}: name it .tar, .tgz or .parquet")
        return [_file_shard(item, fmt)]
    path = Path(item)
    if not path.exists():
        raise UsageError(f"input not found: {item}")
    if path.is_file():
        fmt = format_of(path.name)
        if fmt is None and is_image_name(path.name):
            return [_single_image_shard(path)]
        if fmt is None:
            raise UsageError(f"unsupported input {item}: expected .tar/.tgz/.tar.gz, .parquet, an image or a folder")
        return [_file_shard(str(path), fmt)]
    containers = sorted(
        p for p in path.rglob("*") if p.is_file() and format_of(p.name) and not p.name.startswith(".")
    )
    if containers:
        return [_file_shard(str(p), format_of(p.name) or "") for p in containers]
    folder_shards = manifest.shards_for(path, shard_size)
    if not folder_shards:
        raise UsageError(f"no shards or images found under {item}")
    return folder_shards


def _single_image_shard(path: Path) -> Shard:
    resolved = str(path.resolve())
    return Shard(
        id=f"{_safe_name(path.stem)}-{_path_digest(resolved)}",
        url=str(path.parent.resolve()),
        format="folder",
        members=(path.name,),
    )
