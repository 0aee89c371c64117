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
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UsageError
from ..records import Shard
from .formats import PARQUET_SUFFIXES, TAR_SUFFIXES, format_of, is_image_name, is_remote

MAX_PATTERN_NAMES = 1_000_000  # names one brace pattern may expand to (a typo like {0..30000000} is refused)
_BRACE_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?")


def _expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, refused past `MAX_PATTERN_NAMES` before anything is
    expanded (braceexpand lists a whole range first: {0..30000000} took 4.7 GB and ~50 s)."""
    import braceexpand

    if _pattern_size(pattern) > MAX_PATTERN_NAMES:
        raise UsageError(f"{pattern[:200]}: the pattern expands to more than {MAX_PATTERN_NAMES:,} names; "
                         "split the inputs or use a folder")
    return list(braceexpand.braceexpand(pattern))


def _pattern_size(pattern: str) -> int:
    """How many names a brace pattern expands to: the product of its groups' sizes."""
    total, i = 1, 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] != "{":
            i += 1
            continue
        depth, j = 1, i + 1
        while j < len(pattern) and depth:
            if pattern[j] == "\\":
                j += 2
                continue
            depth += {"{": 1, "}": -1}.get(pattern[j], 0)
            j += 1
        if depth:  # unbalanced: braceexpand keeps it literal
            return total
        total *= _group_size(pattern[i + 1 : j - 1])
        i = j
    return total


def _group_size(inner: str) -> int:
    match = _BRACE_RANGE.fullmatch(inner)
    if match:
        first, last, step = (match.group(1), match.group(2), match.group(3)) if match.group(1) else (
            str(ord(match.group(4))), str(ord(match.group(5))), match.group(6))
        return abs(int(last) - int(first)) // max(abs(int(step or 1)), 1) + 1
    parts, depth, start = [], 0, 0
    for k, char in enumerate(inner):
        if char in "{}":
            depth += 1 if char == "{" else -1
        elif char == "," and depth == 0:
            parts.append(inner[start:k])
            start = k + 1
    parts.append(inner[start:])
    return 1 if len(parts) == 1 else sum(_pattern_size(part) for part in parts)


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



def shard_bytes(shard: Shard) -> int | None:
    """Bytes a shard holds on local disk (a folder chunk: its images), or None where that is
    not known without reading it (remote or piped URLs, files that went away)."""
    if is_remote(shard.url):
        return None
    try:
        if shard.members:
            root = Path(shard.url)
            return sum((root / member).stat().st_size for member in shard.members)
        return Path(shard.url).stat().st_size
    except OSError:
        return None


def is_output_folder(path: Path) -> bool:
    """A dvl-batch OUT (its parts and bookkeeping), which is never read as input. A folder
    that cannot be searched is not one (listing it then gives the clear error: `_walk`)."""
    try:
        return (path / "parts").is_dir() and any((path / name).exists() for name in ("job.json", "progress.json", ".lock"))
    except OSError:
        return False


def _is_regular(path: Path) -> bool:
    """A regular file (following symlinks); FIFOs, devices and sockets are never listed, so never opened."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _searched(here: Path, name: str, skip: frozenset[Path]) -> bool:
    """Whether the search of a folder goes into its subfolder `name`: not hidden, not OUT
    (`skip`), not any other dvl-batch output folder."""
    return not name.startswith(".") and (here / name).resolve() not in skip and not is_output_folder(here / name)


def _walk(root: Path, skip: frozenset[Path]):
    """(folder, sorted visible file names) under root, without hidden folders or output folders.

    A folder that cannot be listed is a usage error, not skipped: its images would be left
    out of the job without a word (os.walk's default)."""
    def refuse(error: OSError) -> None:
        if Path(error.filename).name == "lost+found":  # a file system's own, root-only: never input
            return
        raise UsageError(f"cannot read the folder {error.filename} ({error.strerror}): its images would be left out; "
                         "fix its permissions or name the folders to read")

    for dirpath, dirnames, filenames in os.walk(root, onerror=refuse):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if _searched(here, d, skip))
        yield here, sorted(n for n in filenames if not n.startswith("."))


def _list_folder_images(root: Path, skip: frozenset[Path] = frozenset()) -> list[str]:
    found = []
    for here, names in _walk(root, skip):
        for name in names:
            if is_image_name(name) and format_of(name) is None and _is_regular(here / name):
                found.append((here / name).relative_to(root).as_posix())
    return found


class FolderManifest:
    """Remembers how plain-folder images were split into shards, so reruns stay stable.

    Folder chunks are cut from a sorted listing; if a later run cut again after new
    files appeared, chunk boundaries would move and finished images would be redone.
    The manifest pins existing chunks and puts only unseen files into new chunks.
    """

    def __init__(self, path: Path | None, taken: Callable[[str], bool] = lambda shard_id: False):
        """`taken(id)`: whether a part of that id exists, so a new chunk never reuses its id
        (after the manifest lost a chunk, reusing it would mark new images done)."""
        self.path = path
        self.taken = taken
        self.data: dict[str, list[dict[str, Any]]] = {}
        if path is not None and path.exists():
            try:
                text = path.read_text()
            except OSError as exc:
                raise UsageError(f"cannot read {path} ({exc.strerror or exc}); it must be a readable file") from None
            try:
                data = json.loads(text)
                if not isinstance(data, dict) or not all(
                    isinstance(chunks, list) and all(isinstance(c, dict) and "id" in c and isinstance(c.get("members"), list)
                                                     for c in chunks)
                    for chunks in data.values()
                ):
                    raise ValueError("not a mapping of folders to chunk lists")
            except ValueError as exc:
                raise UsageError(
                    f"{path} is corrupt ({exc}); delete it and rerun: the chunks already done are rebuilt from OUT/parts"
                ) from None
            self.data = data
        self.changed = False
        self.skip: frozenset[Path] = frozenset()

    def add_chunk(self, root: str, shard_id: str, members: list[str]) -> None:
        """Pin a chunk found in OUT (its part) but missing from the manifest."""
        chunks = self.data.setdefault(root, [])
        if all(c["id"] != shard_id for c in chunks):
            chunks.append({"id": shard_id, "members": members})
            self.changed = True

    def shards_for(self, root: Path, shard_size: int) -> list[Shard]:
        key = str(root.resolve())
        chunks = self.data.setdefault(key, [])
        assigned = {m for c in chunks for m in c["members"]}
        fresh = [name for name in _list_folder_images(root, self.skip) if name not in assigned]
        stem = f"{_safe_name(root.resolve().name)}-{_path_digest(key)}"
        used = {c["id"] for c in chunks}
        number = 0
        for start in range(0, len(fresh), shard_size):
            while f"{stem}-{number:06d}" in used or self.taken(f"{stem}-{number:06d}"):
                number += 1
            members = fresh[start : start + shard_size]
            chunks.append({"id": f"{stem}-{number:06d}", "members": members})
            used.add(chunks[-1]["id"])
            self.changed = True
        return [Shard(id=c["id"], url=key, format="folder", members=tuple(c["members"])) for c in chunks]

    def save(self, write: Callable[[Path, bytes], None]) -> None:
        """Store new chunks with `write(path, data)` (the sink's atomic write): OUT is the sink's."""
        if self.path is None or not self.changed:
            return
        write(self.path, json.dumps(self.data).encode())
        self.changed = False


def discover_shards(
    inputs: tuple[str, ...] | list[str], shard_size: int, manifest: FolderManifest | None = None,
    exclude: tuple[str | Path, ...] = (),
):
    """Expand inputs (files, dirs, brace patterns, URLs) into a de-duplicated shard list.

    Folders named in `exclude` (the job's OUT) and any dvl-batch output folder found
    while searching are skipped: a run never reads its own parts as input.
    """
    if not inputs:
        raise UsageError("no input given: pass shard files, a folder, or a pattern like 'shards/{000..009}.tar'")
    manifest = manifest or FolderManifest(None)
    manifest.skip = frozenset(Path(p).resolve() for p in exclude)
    shards: list[Shard] = []
    if any(not str(raw).strip() for raw in inputs):  # Path("") is the current folder: never read it by accident
        raise UsageError("an input is empty (''): name shard files, a folder or a pattern")
    items = [item for raw in inputs for item in _expand_braces(raw)]
    _refuse_nested_inputs(items, manifest.skip)
    for item in items:
        shards.extend(_shards_of(item, shard_size, manifest))
    unique: dict[str, Shard] = {}
    for shard in shards:
        unique.setdefault(shard.id, shard)
    return list(unique.values())


def _refuse_nested_inputs(items: list[str], skip: frozenset[Path]) -> None:
    """A folder, or a loose image, named as an input and also lying inside a folder input
    would have its images answered twice, as different shards under different keys. (Shard
    files are shards by their own path: naming one twice gives it once.)"""
    folders = {Path(i).resolve() for i in items if not is_remote(i) and os.path.isdir(i)}
    for item in items:
        if is_remote(item) or format_of(item) is not None or not os.path.exists(item):
            continue
        path = Path(item).resolve()
        outer = next((f for f in folders if f != path and f in path.parents and _walk_reaches(f, path, skip)), None)
        if outer is not None and (os.path.isfile(item) or _list_folder_images(path)):
            raise UsageError(f"{item} lies inside the input folder {outer}: its images would be answered twice; "
                             "name each folder once")


def _walk_reaches(root: Path, inner: Path, skip: frozenset[Path]) -> bool:
    """Whether `_walk(root)` gets to `inner`: each folder on the way is one it searches, and
    an image is not hidden."""
    here = root
    for step in (inner if inner.is_dir() else inner.parent).relative_to(root).parts:
        if not _searched(here, step, skip):
            return False
        here = here / step
    return not inner.name.startswith(".")


def _shards_of(item: str, shard_size: int, manifest: FolderManifest) -> list[Shard]:
    if is_remote(item):
        fmt = format_of(item)
        if fmt is None:
            raise UsageError(f"cannot tell the format of {item}: name it .tar, .tgz or .parquet")
        return [_file_shard(item, fmt)]
    path = Path(item)
    try:  # os.stat, not Path.exists: from Python 3.14 that says False for any error
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"input not found: {item}") from None
    except OSError as exc:  # a folder on the way that may not be searched
        raise UsageError(f"cannot read the input {item} ({exc.strerror}); check the permissions of the folders "
                         "on its path") from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # a FIFO or device would block or never end
        raise UsageError(f"unsupported input {item}: not a regular file or a folder")
    if stat.S_ISREG(mode):
        fmt = format_of(path.name)
        if fmt is None and is_image_name(path.name):
            return [_single_image_shard(path)]
        if fmt is None:
            raise UsageError(f"unsupported input {item}: expected .tar/.tgz/.tar.gz, .parquet, an image or a folder")
        return [_file_shard(str(path), fmt)]
    if path.resolve() in manifest.skip:
        raise UsageError(f"{item} is this run's output folder (-o) as well as its input: write the results elsewhere")
    if is_output_folder(path):
        raise UsageError(f"{item} is a dvl-batch output folder, not an input")
    # Shard files and loose images side by side are both inputs: one stray .parquet in a
    # folder of photos must not hide the photos (nor the other way round).
    containers = [here / n for here, names in _walk(path, manifest.skip) for n in names
                  if format_of(n) and _is_regular(here / n)]
    shards = [_file_shard(str(p), format_of(p.name) or "") for p in sorted(containers)]
    if any(is_image_name(n) and not format_of(n) for _, names in _walk(path, manifest.skip) for n in names):
        shards.extend(manifest.shards_for(path, shard_size))
    if not shards:
        raise UsageError(f"no shards or images found under {item}")
    return shards


def _single_image_shard(path: Path) -> Shard:
    resolved = str(path.resolve())
    return Shard(
        id=f"{_safe_name(path.stem)}-{_path_digest(resolved)}",
        url=str(path.parent.resolve()),
        format="folder",
        members=(path.name,),
    )
