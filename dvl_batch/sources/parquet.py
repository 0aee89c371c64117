"""Parquet shards: one file, images as bytes, HF-datasets {bytes, path} structs, paths or lists.

A parquet file is read from its footer backwards, so a remote one (http(s)://, pipe:, s3://
...) is first copied to a local temporary file, a stream at a time; a transient failure
of that copy is retried with backoff like a tar shard's read, and a shard that still
fails ends unreadable (no part; the next run tries it again).

The copies are named after the machine and process that make them
(`dvl-batch-HOST-PID-*.parquet` in the temporary folder, `TMPDIR`): a killed run cannot
remove its copy, so each new copy first removes this machine's copies of processes that
no longer exist (a folder shared between machines keeps the others' copies). A copy
stops, and the shard ends unreadable with the reason, when it would leave less than
`TEMP_RESERVE_BYTES` (at most a tenth of that disk) free: a huge remote shard must not fill
the disk the run writes to.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..processes import process_alive
from ..records import RawSample, Shard, ShardEnd
from .formats import (
    DEFAULT_MAX_FILE_BYTES,
    KeyRegistry,
    is_remote,
    is_transient,
    open_stream,
    read_regular_file,
    shard_error_sample,
    too_large,
    unreadable_end,
)

KEY_COLUMNS = ("key", "__key__", "id", "image_id", "uid")
PATH_COLUMNS = ("image_path", "path", "file_name", "filename", "filepath", "file")
BATCH_BYTES = 256 * 2**20  # rows decoded at once are sized to about this many bytes
NULL_KEY = "__null_key__"  # prefix of the key of a row whose key column is null (never a real key's form)
COPY_PREFIX = "dvl-batch-"
TEMP_RESERVE_BYTES = 2 * 2**30  # free space a remote shard's copy must leave on the temporary folder's disk
CHUNK = 1 << 20


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


def _parquet_images(value: Any, kind: str, base_dir: Path, max_bytes: int) -> list[bytes]:
    if value is None:
        return []
    if kind == "bytes":
        if len(value) > max_bytes:
            raise OSError(0, too_large(len(value), max_bytes))
        return [value]
    if kind == "struct":
        if value.get("bytes") is not None:
            return _parquet_images(value["bytes"], "bytes", base_dir, max_bytes)
        if value.get("path"):
            return _parquet_images(value["path"], "path", base_dir, max_bytes)
        return []
    if kind == "path":
        path = Path(value)
        return [read_regular_file(path if path.is_absolute() else base_dir / path, max_bytes)]
    out: list[bytes] = []
    for number, item in enumerate(value, 1):  # a null image in a list must not shift the others silently
        images = _parquet_images(item, "struct" if isinstance(item, dict) else "bytes", base_dir, max_bytes)
        if not images:
            raise ValueError(f"image {number} of the {len(value)} in its list is null")
        out.extend(images)
    return out


def _batch_rows(source) -> int:
    """Rows per decoded batch: 64, fewer when rows are large (a row group of 50 MB images)."""
    meta = source.metadata
    if not meta.num_rows or not meta.num_row_groups:
        return 64
    average = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) / meta.num_rows
    return max(1, min(64, int(BATCH_BYTES // max(average, 1))))


def _row_key(row: dict[str, Any], column: str | None, count: int) -> str:
    if column is None:
        return f"{count:08d}"
    value = row.get(column)
    return f"{NULL_KEY}{count:08d}" if value is None else str(value)


def read_parquet(
    shard: Shard, image_field: str | None, key_field: str | None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    retries: int = 3, backoff: float = 1.0,
) -> Iterator[RawSample | ShardEnd]:
    """Every row of a parquet shard as a sample, then one ShardEnd."""
    if not is_remote(shard.url):
        yield from _read_file(shard, shard.url, image_field, key_field, max_bytes)
        return
    local, problem, attempt = None, "", 0
    for attempt in range(retries + 1):
        try:
            local = _copy_to_temporary(shard.url)
            break
        except Exception as exc:  # noqa: BLE001 - a failed copy is retried, then reported
            problem = str(exc)
            if not is_transient(exc):
                break
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
    if local is None:
        yield unreadable_end(shard, 0, attempt, problem)  # a lasting failure is not retried
        return
    try:
        yield from _read_file(shard, local, image_field, key_field, max_bytes)
    finally:
        os.unlink(local)


def _copy_to_temporary(url: str) -> str:
    """The remote file's bytes in a local temporary file (removed by the caller, or here on failure)."""
    folder = tempfile.gettempdir()
    remove_stale_copies(Path(folder))
    _check_room(folder, 0)
    fd, name = tempfile.mkstemp(prefix=f"{_copy_prefix()}{os.getpid()}-", suffix=".parquet", dir=folder)
    try:
        with os.fdopen(fd, "wb") as local, open_stream(url) as stream:
            copied = 0
            while chunk := stream.read(CHUNK):
                local.write(chunk)
                copied += len(chunk)
                if copied % (64 * CHUNK) < len(chunk):  # every 64 MiB
                    _check_room(folder, copied)
    except BaseException:
        os.unlink(name)
        raise
    return name


def _copy_prefix() -> str:
    """`dvl-batch-HOST-`: copies of other machines are never judged by this machine's processes."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f"{COPY_PREFIX}{host}-"


def _check_room(folder: str, copied: int) -> None:
    usage = shutil.disk_usage(folder)
    reserve = min(TEMP_RESERVE_BYTES, usage.total // 10)
    if usage.free < reserve:
        raise OSError(f"no room to copy the remote parquet shard: {copied / 2**20:.0f} MiB copied and less than "
                      f"{reserve / 2**30:.0f} GiB free in {folder} (set TMPDIR to a larger disk)")


def remove_stale_copies(folder: Path) -> int:
    """Delete this machine's remote-shard copies whose process has died (a SIGKILL leaves them);
    returns how many."""
    removed, prefix = 0, _copy_prefix()
    for path in folder.glob(f"{prefix}*-*.parquet"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            try:
                path.unlink()
                removed += 1
            except OSError:  # another run removed it first, or it is not ours to remove
                pass
    return removed


def _read_file(
    shard: Shard, path: str, image_field: str | None, key_field: str | None, max_bytes: int,
) -> Iterator[RawSample | ShardEnd]:
    import pyarrow.parquet as pq

    count = 0
    keys = KeyRegistry()
    try:
        source = pq.ParquetFile(path)
        layout = parquet_layout(source.schema_arrow, image_field, key_field)
    except UsageError:
        raise
    except PermissionError as exc:  # fixable: no part, so the next run reads it
        yield unreadable_end(shard, 0, 0, str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable shard
        yield shard_error_sample(f"unreadable parquet file: {exc}")
        yield ShardEnd(shard, 1, partial=True, message=f"unreadable parquet file: {exc}")
        return
    no_image = None
    if layout.image_column is None:
        no_image = f"no image column found; columns: {', '.join(source.schema_arrow.names)}"
    columns = sorted({layout.image_column, *layout.text_columns, layout.key_column} - {None})
    base_dir = Path(shard.url).parent

    def end(partial: bool = False, message: str | None = None) -> ShardEnd:
        notes = "; ".join(n for n in (message, keys.note()) if n) or None
        return ShardEnd(shard, count, partial=partial, message=notes, duplicate_keys=keys.duplicates)

    try:
        for batch in source.iter_batches(batch_size=_batch_rows(source), columns=columns or None):
            for row in batch.to_pylist():
                stored = _row_key(row, layout.key_column, count)
                key = keys.unique(stored)
                fields = {c: row[c] for c in layout.text_columns if row.get(c) is not None}
                sample = RawSample(
                    key=key, index=count, fields=fields, field_names=tuple(source.schema_arrow.names),
                    image_names=(layout.image_column,) if layout.image_column else (), error=no_image,
                    source_key=stored if key != stored else None,
                )
                try:
                    if no_image is None:
                        sample.images = _parquet_images(row[layout.image_column], layout.image_kind, base_dir, max_bytes)
                        if not sample.images:
                            sample.error = f"no image data in column '{layout.image_column}' (null)"
                except OSError as exc:
                    sample.error = f"cannot read image: {exc.strerror or exc}" if exc.errno == 0 else f"cannot read image file: {exc}"
                except (ValueError, TypeError, AttributeError) as exc:  # a cell of the wrong shape: this row only
                    sample.error = f"cannot read image from column '{layout.image_column}': {str(exc)[:200]}"
                yield sample
                count += 1
    except Exception as exc:  # noqa: BLE001 - a corrupt page ends the shard, rows before it stay
        message = f"read error after {count} rows: {exc}"
        if count == 0:
            yield shard_error_sample(f"unreadable parquet file: {exc}")
            count = 1
        yield end(True, message)
        return
    yield end()
