"""Webdataset shards: a tar/tgz stream whose consecutive members sharing a key form a sample."""

from __future__ import annotations

import json
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from ..records import RawSample, Shard, ShardEnd
from .formats import IMAGE_EXTENSIONS, TransientReadError, is_transient, open_stream, shard_error_sample


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


def _tar_sample(key: str, index: int, members: dict[str, bytes], image_field: str | None) -> RawSample:
    fields: dict[str, Any] = {}
    for name, data in members.items():
        value = _decode_text_field(name, data)
        if value is not None:
            fields[name] = value
    image_names = pick_image_fields(members, image_field)
    sample = RawSample(
        key=key, index=index, images=[members[n] for n in image_names], fields=fields,
        field_names=tuple(sorted(members)), image_names=tuple(image_names),
    )
    if not image_names:
        found = ", ".join(sorted(members)) or "none"
        wanted = f"'{image_field}'" if image_field else "an image field (" + "/".join(IMAGE_EXTENSIONS[:5]) + "...)"
        sample.error = f"no image: expected {wanted}, fields found: {found}"
    return sample


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


def read_webdataset(shard: Shard, image_field: str | None, retries: int = 3,
                    backoff: float = 1.0) -> Iterator[RawSample | ShardEnd]:
    """Stream a tar/tgz shard; a transient read failure (a failing `pipe:` command, a network
    error, EIO) reopens it after a backoff (1, 2, 4... s) and skips the samples already
    yielded. A shard that still fails ends with `ShardEnd(unreadable=True)`: no part is
    written, and the next run tries it again."""
    delivered = 0
    for attempt in range(retries + 1):
        try:
            for item in _read_once(shard, image_field):
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
    tries = f"{retries + 1} attempts" if retries else "1 attempt"
    yield ShardEnd(shard, delivered, partial=True, unreadable=True, message=f"could not be read ({tries}): {problem}")


def _read_once(shard: Shard, image_field: str | None) -> Iterator[RawSample | ShardEnd]:
    """Stream a tar/tgz shard, grouping consecutive members by key as webdataset does.

    Cut shards keep every sample read before the cut; the sample whose member data was
    cut becomes an error row, and the ShardEnd says partial. Member names are only
    ever split into key and field, never used as paths: absolute and `..` names are
    reported as error rows and skipped.
    """
    count = 0
    current_key: str | None = None
    members: dict[str, bytes] = {}
    reading: str | None = None  # "key.ext" of the member whose data is being read
    ending = _TarEnding()
    try:
        with open_stream(shard.url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=ending.tarinfo) as archive:
            for info in archive:
                if not info.isfile():
                    continue
                name = info.name
                if _unsafe_member(name):
                    yield RawSample(key=name, index=count, error=f"unsafe tar member name '{name}' skipped")
                    count += 1
                    continue
                split = split_member_name(name)
                if split is None or PurePosixPath(name).name.startswith("__"):
                    continue
                key, ext = split
                if key != current_key and current_key is not None:
                    yield _tar_sample(current_key, count, members, image_field)
                    count += 1
                    members = {}
                current_key, reading = key, name
                handle = archive.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
                reading = None
    except Exception as exc:  # noqa: BLE001 - any read failure ends the shard; rows before it stay
        if is_transient(exc) or is_transient(exc.__cause__ or exc.__context__ or exc):
            raise TransientReadError(str(exc) if is_transient(exc) else str(exc.__cause__ or exc.__context__)) from exc
        message = f"read error after {count} complete samples: {exc}"
        if reading is not None:
            yield RawSample(key=current_key or reading, index=count, error=f"shard cut inside this sample ('{reading}'): {exc}")
            count += 1
        elif current_key is not None:
            yield _tar_sample(current_key, count, members, image_field)
            count += 1
        elif count == 0:
            yield shard_error_sample(f"unreadable tar shard: {exc}")
            count = 1
        yield ShardEnd(shard, count, partial=True, message=message)
        return
    if current_key is not None:
        yield _tar_sample(current_key, count, members, image_field)
        count += 1
    if ending.problem:
        yield ShardEnd(shard, count, partial=True, message=f"{ending.problem} after {count} samples")
        return
    yield ShardEnd(shard, count)
