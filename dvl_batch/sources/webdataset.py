"""Webdataset shards: a tar/tgz stream whose consecutive members sharing a key form a sample."""

from __future__ import annotations

import json
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from ..records import RawSample, Shard, ShardEnd
from .formats import (
    DEFAULT_MAX_FILE_BYTES,
    IMAGE_EXTENSIONS,
    KeyRegistry,
    TransientReadError,
    is_transient,
    open_stream,
    safe_text,
    shard_error_sample,
    too_large,
    unreadable_end,
)

HARD_LINK_BUDGET = 16 * 2**20  # bytes of recent members kept for hard links to point back at


SAMPLE_BYTES_PER_FILE_CAP = 4  # one sample's members together hold at most this many times --max-file-bytes


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's convention: key = path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def _unsafe_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name.startswith("/") or ".." in parts


def pick_image_fields(fields: dict[str, Any], wanted: str | None) -> list[str]:
    """Which fields of a sample hold its image(s); several for multi-image samples."""
    if wanted:
        names = [w.strip().lower() for w in wanted.split(",") if w.strip()]
        return [n for n in names if n in fields]
    exts = [name for name in fields if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    return sorted(exts, key=lambda n: (n.count("."), _natural_key(n)))


def _natural_key(name: str) -> list[Any]:
    """'2.jpg' before '10.jpg': image order in a multi-image sample is the prompt's order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _decode_text_field(name: str, data: bytes) -> Any:
    if name.endswith(("txt", "text", "caption", "question")):
        return data.decode("utf-8", errors="replace")
    if name.endswith("json"):
        try:
            return json.loads(data)
        except ValueError:
            return data.decode("utf-8", errors="replace")
    return None


def _tar_sample(
    key: str, index: int, members: dict[str, bytes], image_field: str | None, keys: KeyRegistry,
    problems: dict[str, str],
) -> RawSample:
    fields: dict[str, Any] = {}
    for name, data in members.items():
        value = _decode_text_field(name, data)
        if value is not None:
            fields[name] = value
    image_names = pick_image_fields(members, image_field)
    stored, unique = safe_text(key), keys.unique(key)
    sample = RawSample(
        key=unique, index=index, images=[members[n] for n in image_names], fields=fields,
        field_names=tuple(sorted(safe_text(n) for n in {*members, *problems})), image_names=tuple(image_names),
        source_key=stored if unique != stored else None,
    )
    if problems:
        sample.error = "; ".join(f"member '{safe_text(key)}.{safe_text(ext)}': {why}" for ext, why in problems.items())
    elif not image_names:
        found = ", ".join(sample.field_names) or "none"
        wanted = f"'{image_field}'" if image_field else "an image field (" + "/".join(IMAGE_EXTENSIONS[:5]) + "...)"
        sample.error = f"no image: expected {wanted}, fields found: {found}"
    return sample


def _skip_member(archive: tarfile.TarFile, step: int = 8 * 2**20) -> None:
    """Read past the member just listed, in `step`-byte reads, to the next header.

    tarfile would skip it itself, but in 10 KB reads that each copy what is left of its
    decompression buffer: a 2 GB member of gzipped zeros took 45 s that way, 8 s this way
    (2 shared cores).
    Memory stays at about `step` plus one decompressed chunk. (A sparse member's next
    header follows its stored bytes, which is all that is skipped.)"""
    stream = archive.fileobj
    target = archive.offset
    while stream.tell() < target:
        if not stream.read(min(step, target - stream.tell())):
            break


class _RecentMembers:
    """The data of the last members read (up to `budget` bytes), so that a hard link, which
    a streamed tar cannot seek back for, still gets its target's bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.data: OrderedDict[str, bytes] = OrderedDict()
        self.size = 0

    def add(self, name: str, data: bytes) -> None:
        self.data[name] = data
        self.size += len(data)
        while self.size > self.budget and len(self.data) > 1:
            self.size -= len(self.data.popitem(last=False)[1])

    def get(self, name: str) -> bytes | None:
        return self.data.get(name)


class _TarEnding:
    """Tells a tar stream that ended at its end-of-archive block from one that was cut.

    tarfile stops iterating *silently* at a missing, short or garbled header, which is
    exactly what a shard cut at a member boundary (or a half-downloaded .tgz) looks
    like. The TarInfo subclass handed to tarfile sees the header block that ended the
    iteration and records why, so such a shard is reported partial, not complete.
    """

    def __init__(self) -> None:
        self.problem: str | None = None
        ending = self

        class RecordingTarInfo(tarfile.TarInfo):
            @classmethod
            def frombuf(cls, buf, encoding, errors):
                try:
                    return super().frombuf(buf, encoding, errors)
                except tarfile.EOFHeaderError:
                    raise  # the zero block that ends a complete archive
                except tarfile.HeaderError as exc:
                    ending.problem = (
                        "the archive ends without its end-of-archive block (cut short?)"
                        if isinstance(exc, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError))
                        else f"corrupt member header ({exc})"
                    )
                    raise

        self.tarinfo = RecordingTarInfo


def read_webdataset(shard: Shard, image_field: str | None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                    retries: int = 3, backoff: float = 1.0) -> Iterator[RawSample | ShardEnd]:
    """Stream a tar/tgz shard; a transient read failure (a failing `pipe:` command, a network
    error, EIO) reopens it after a backoff (1, 2, 4... s) and skips the samples already
    yielded. A shard that still fails ends with `ShardEnd(unreadable=True)`: no part is
    written, and the next run tries it again."""
    delivered = 0
    for attempt in range(retries + 1):
        try:
            for item in _read_once(shard, image_field, max_bytes):
                if isinstance(item, RawSample):
                    if item.index < delivered:
                        continue
                    delivered = item.index + 1
                yield item
            return
        except Exception as exc:  # noqa: BLE001 - only transient ones reach here
            problem = str(exc)
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
    yield unreadable_end(shard, delivered, retries, problem)


def _read_once(shard: Shard, image_field: str | None, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[RawSample | ShardEnd]:
    """Stream a tar/tgz shard, grouping consecutive members by key as webdataset does.

    Cut shards keep every sample read before the cut; the sample whose member data was
    cut becomes an error row, and the ShardEnd says partial. Member names are only
    ever split into key and field, never used as paths: absolute and `..` names are
    reported as error rows and skipped. A member over `max_bytes` (its size is in its
    header) is skipped unread and makes its sample an error row, so memory stays bounded
    whatever the archive claims. A field seen twice under one key starts a new sample;
    keys seen before are renamed KEY#N (counted in the ShardEnd), never merged.
    """
    count = 0
    keys = KeyRegistry()
    current_key: str | None = None
    members: dict[str, bytes] = {}
    problems: dict[str, str] = {}
    recent = _RecentMembers(min(max_bytes, HARD_LINK_BUDGET))
    reading: str | None = None  # "key.ext" of the member whose data is being read
    ending = _TarEnding()

    def end(partial: bool = False, message: str | None = None) -> ShardEnd:
        notes = "; ".join(n for n in (message, keys.note()) if n) or None
        return ShardEnd(shard, count, partial=partial, message=notes, duplicate_keys=keys.duplicates)

    try:
        with open_stream(shard.url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=ending.tarinfo) as archive:
            for info in archive:
                if not (info.isfile() or info.islnk()):
                    continue
                name = info.name
                if _unsafe_member(name):
                    yield RawSample(key=keys.unique(name), index=count,
                                    error=f"unsafe tar member name '{safe_text(name)}' skipped")
                    count += 1
                    continue
                split = split_member_name(name)
                if split is None or PurePosixPath(name).name.startswith("__"):
                    continue
                key, ext = split
                if current_key is not None and (key != current_key or ext in members or ext in problems):
                    yield _tar_sample(current_key, count, members, image_field, keys, problems)
                    count += 1
                    members, problems = {}, {}
                current_key, reading = key, name
                if info.islnk():
                    data = recent.get(info.linkname)
                    if data is None:
                        problems[ext] = f"hard link to '{safe_text(info.linkname)}', whose data is no longer at hand"
                elif info.size > max_bytes:
                    problems[ext], data = too_large(info.size, max_bytes), None
                    _skip_member(archive)
                elif sum(map(len, members.values())) + info.size > SAMPLE_BYTES_PER_FILE_CAP * max_bytes:
                    # many members of one key (a small .tgz of zeros can hold thousands): bounded too
                    problems["*"], data = f"members past {SAMPLE_BYTES_PER_FILE_CAP}x the per-file cap in all, skipped", None
                    _skip_member(archive)
                else:
                    handle = archive.extractfile(info)
                    data = handle.read() if handle is not None else b""
                if data is not None:
                    members[ext] = data
                    recent.add(name, data)
                reading = None
    except Exception as exc:  # noqa: BLE001 - any read failure ends the shard; rows before it stay
        if is_transient(exc) or is_transient(exc.__cause__ or exc.__context__ or exc):
            raise TransientReadError(str(exc) if is_transient(exc) else str(exc.__cause__ or exc.__context__)) from exc
        message = safe_text(f"read error after {count} complete samples: {exc}")
        if reading is not None:
            yield RawSample(key=keys.unique(current_key or reading), index=count,
                            error=safe_text(f"shard cut inside this sample ('{reading}'): {exc}"))
            count += 1
        elif current_key is not None:
            yield _tar_sample(current_key, count, members, image_field, keys, problems)
            count += 1
        elif count == 0:
            if isinstance(exc, PermissionError):  # fixable: no part, so the next run reads it
                yield unreadable_end(shard, 0, 0, safe_text(str(exc)))
                return
            yield shard_error_sample(safe_text(f"unreadable tar shard: {exc}"))
            count = 1
        yield end(True, message)
        return
    if current_key is not None:
        yield _tar_sample(current_key, count, members, image_field, keys, problems)
        count += 1
    if ending.problem:
        yield end(True, f"{ending.problem} after {count} samples")
        return
    yield end()
