"""Sources: turn user inputs into shards, and shards into raw samples.

A shard is the unit of scheduling and of resume: one webdataset tar, one parquet
file, or one chunk of a plain image folder. Its id is stable across runs (derived
from the resolved path, not from the set of inputs), so an incremental cron run that
finds new shards next to old ones processes only the new ones.

Readers never decode images: they yield encoded bytes plus text fields, and they
never raise for bad content. A broken member becomes a sample with `error` set; a
shard cut short (truncated tar) ends with `ShardEnd(partial=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UsageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jp2", "img", "image")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
KEY_COLUMNS = ("key", "__key__", "id", "image_id", "uid")
PATH_COLUMNS = ("image_path", "path", "file_name", "filename", "filepath", "file")
SHARD_ROW_KEY = "__shard__"  # key of the single row that reports an unreadable shard


@dataclass(frozen=True)
class Shard:
    """One unit of work: its part file is `OUT/parts/<id>.parquet`."""

    id: str
    url: str
    format: str  # "webdataset" | "parquet" | "folder"
    members: tuple[str, ...] = ()  # folder shards: image paths relative to `url`


@dataclass
class RawSample:
    """A sample as stored: encoded image bytes and text fields, not yet decoded."""

    key: str
    index: int
    images: list[bytes] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    field_names: tuple[str, ...] = ()  # every field/column present (for inspect and error messages)
    image_names: tuple[str, ...] = ()  # the fields the images came from


@dataclass(frozen=True)
class ShardEnd:
    """Sent after a shard's last sample: how many there were and whether it was cut."""

    shard: Shard
    n_samples: int
    partial: bool = False
    message: str | None = None


# ---------------------------------------------------------------- discovery


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _path_digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "shard"


def _file_shard(path: str, fmt: str) -> Shard:
    is_url = "://" in path or path.startswith("pipe:")
    resolved = path if is_url else str(Path(path).resolve())
    base = PurePosixPath(path.split("::")[-1]).name
    for suffix in TAR_SUFFIXES + PARQUET_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return Shard(id=f"{_safe_name(base)}-{_path_digest(resolved)}", url=resolved, format=fmt)


def _format_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "webdataset"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


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

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        from .sink import atomic_write_bytes

        atomic_write_bytes(self.path, json.dumps(self.data).encode())
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
    if "://" in item or item.startswith("pipe:"):
        fmt = _format_of(item)
        if fmt is None:
            raise UsageError(f"cannot tell the format of {item}: name it .tar, .tgz or .parquet")
        return [_file_shard(item, fmt)]
    path = Path(item)
    if not path.exists():
        raise UsageError(f"input not found: {item}")
    if path.is_file():
        fmt = _format_of(path.name)
        if fmt is None and is_image_name(path.name):
            return [_single_image_shard(path)]
        if fmt is None:
            raise UsageError(f"unsupported input {item}: expected .tar/.tgz/.tar.gz, .parquet, an image or a folder")
        return [_file_shard(str(path), fmt)]
    containers = sorted(
        p for p in path.rglob("*") if p.is_file() and _format_of(p.name) and not p.name.startswith(".")
    )
    if containers:
        return [_file_shard(str(p), _format_of(p.name) or "") for p in containers]
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


# ---------------------------------------------------------------- reading


def _open_stream(url: str):
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


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


def _shard_error_sample(message: str) -> RawSample:
    """The single row that says a shard could not be read at all (so it is not silently empty)."""
    return RawSample(key=SHARD_ROW_KEY, index=0, error=message)


def read_webdataset(shard: Shard, image_field: str | None) -> Iterator[RawSample | ShardEnd]:
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
        with _open_stream(shard.url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=ending.tarinfo) as archive:
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
        message = f"read error after {count} complete samples: {exc}"
        if reading is not None:
            yield RawSample(key=current_key or reading, index=count, error=f"shard cut inside this sample ('{reading}'): {exc}")
            count += 1
        elif current_key is not None:
            yield _tar_sample(current_key, count, members, image_field)
            count += 1
        elif count == 0:
            yield _shard_error_sample(f"unreadable tar shard: {exc}")
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


@dataclass(frozen=True)
class ParquetLayout:
    """Which columns of a parquet file hold image data, keys and text."""

    image_column: str | None
    image_kind: str  # "bytes" | "struct" | "path" | "list"
    key_column: str | None
    text_columns: tuple[str, ...]


def _image_kind(arrow_type) -> str | None:
    import pyarrow as pa

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "bytes"
    if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return "list" if _image_kind(arrow_type.value_type) in ("bytes", "struct") else None
    return None


def parquet_layout(schema, image_field: str | None, key_field: str | None) -> ParquetLayout:
    import pyarrow as pa

    names = list(schema.names)
    text_columns = tuple(n for n in names if pa.types.is_string(schema.field(n).type) or pa.types.is_large_string(schema.field(n).type))
    image_column, kind = None, "bytes"
    if image_field:
        if image_field not in names:
            raise UsageError(f"image column '{image_field}' not found; columns: {', '.join(names)}")
        image_column = image_field
        kind = _image_kind(schema.field(image_field).type) or ("path" if image_field in text_columns else "")
        if not kind:
            raise UsageError(f"column '{image_field}' holds {schema.field(image_field).type}, not images or paths")
    else:
        ranked = sorted(names, key=lambda n: (n.lower() not in ("image", "images", "img", "jpg", "png"), names.index(n)))
        for name in ranked:
            detected = _image_kind(schema.field(name).type)
            if detected:
                image_column, kind = name, detected
                break
        if image_column is None:
            for name in PATH_COLUMNS:
                if name in text_columns:
                    image_column, kind = name, "path"
                    break
    if key_field and key_field not in names:
        raise UsageError(f"key column '{key_field}' not found; columns: {', '.join(names)}")
    key_column = key_field or next((n for n in KEY_COLUMNS if n in names), None)
    return ParquetLayout(image_column, kind, key_column, text_columns)


def _parquet_images(value: Any, kind: str, base_dir: Path) -> list[bytes]:
    if value is None:
        return []
    if kind == "bytes":
        return [value]
    if kind == "struct":
        if value.get("bytes") is not None:
            return [value["bytes"]]
        if value.get("path"):
            return _parquet_images(value["path"], "path", base_dir)
        return []
    if kind == "path":
        path = Path(value)
        return [(path if path.is_absolute() else base_dir / path).read_bytes()]
    out: list[bytes] = []
    for item in value:
        out.extend(_parquet_images(item, "struct" if isinstance(item, dict) else "bytes", base_dir))
    return out


def read_parquet(shard: Shard, image_field: str | None, key_field: str | None) -> Iterator[RawSample | ShardEnd]:
    import pyarrow.parquet as pq

    count = 0
    try:
        source = pq.ParquetFile(_open_stream(shard.url) if "://" in shard.url else shard.url)
        layout = parquet_layout(source.schema_arrow, image_field, key_field)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable shard
        yield _shard_error_sample(f"unreadable parquet file: {exc}")
        yield ShardEnd(shard, 1, partial=True, message=f"unreadable parquet file: {exc}")
        return
    no_image = None
    if layout.image_column is None:
        no_image = f"no image column found; columns: {', '.join(source.schema_arrow.names)}"
    columns = sorted({layout.image_column, *layout.text_columns, layout.key_column} - {None})
    base_dir = Path(shard.url).parent
    try:
        for batch in source.iter_batches(batch_size=64, columns=columns or None):
            for row in batch.to_pylist():
                key = str(row[layout.key_column]) if layout.key_column and row.get(layout.key_column) is not None else f"{count:08d}"
                fields = {c: row[c] for c in layout.text_columns if row.get(c) is not None}
                sample = RawSample(
                    key=key, index=count, fields=fields, field_names=tuple(source.schema_arrow.names),
                    image_names=(layout.image_column,) if layout.image_column else (), error=no_image,
                )
                try:
                    if no_image is None:
                        sample.images = _parquet_images(row[layout.image_column], layout.image_kind, base_dir)
                        if not sample.images:
                            sample.error = f"no image data in column '{layout.image_column}' (null)"
                except OSError as exc:
                    sample.error = f"cannot read image file: {exc}"
                yield sample
                count += 1
    except Exception as exc:  # noqa: BLE001 - a corrupt page ends the shard, rows before it stay
        message = f"read error after {count} rows: {exc}"
        if count == 0:
            yield _shard_error_sample(f"unreadable parquet file: {exc}")
            count = 1
        yield ShardEnd(shard, count, partial=True, message=message)
        return
    yield ShardEnd(shard, count)


def read_folder(shard: Shard) -> Iterator[RawSample | ShardEnd]:
    root = Path(shard.url)
    for index, name in enumerate(shard.members):
        sample = RawSample(key=name, index=index, field_names=("file",), image_names=("file",))
        try:
            sample.images = [(root / name).read_bytes()]
        except OSError as exc:
            sample.error = f"cannot read file: {exc.strerror or exc}"
        yield sample
    yield ShardEnd(shard, len(shard.members))


def read_shard(shard: Shard, image_field: str | None = None, key_field: str | None = None):
    """Yield every sample of a shard, then exactly one ShardEnd."""
    if shard.format == "webdataset":
        return read_webdataset(shard, image_field)
    if shard.format == "parquet":
        return read_parquet(shard, image_field, key_field)
    if shard.format == "folder":
        return read_folder(shard)
    raise ValueError(f"unknown shard format {shard.format}")


def shard_from_dict(data: dict[str, Any]) -> Shard:
    return Shard(id=data["id"], url=data["url"], format=data["format"], members=tuple(data.get("members", ())))


__all__ = [
    "FolderManifest",
    "RawSample",
    "Shard",
    "ShardEnd",
    "discover_shards",
    "read_shard",
]
