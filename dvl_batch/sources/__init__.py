"""Sources, the first stage: user inputs to shards, and shards to raw samples.

A shard is the unit of scheduling and of resume: one webdataset tar, one parquet
file, or one chunk of a plain image folder. Its id is stable across runs (derived
from the resolved path, not from the set of inputs), so an incremental cron run that
finds new shards next to old ones processes only the new ones.

Readers never decode images: they yield encoded bytes plus text fields, and they
never raise for bad content. A broken member becomes a sample with `error` set; a
shard cut short (truncated tar) ends with `ShardEnd(partial=True)`.

- `discovery.py`: inputs to shards, and the folder manifest.
- `webdataset.py`, `parquet.py`, `folder.py`: one reader per shard format.
- `formats.py`: what the readers share.

Imports only `records`, `errors` and `config`.
"""

from __future__ import annotations

from ..records import Shard
from .discovery import FolderManifest, discover_shards, shard_bytes
from .folder import read_folder
from .formats import DEFAULT_MAX_FILE_BYTES, SHARD_ROW_KEY, name_of_key, safe_text
from .parquet import read_parquet
from .webdataset import read_webdataset

__all__ = [
    "DEFAULT_MAX_FILE_BYTES", "SHARD_ROW_KEY", "FolderManifest", "discover_shards", "name_of_key", "read_shard",
    "safe_text", "shard_bytes",
]


def read_shard(
    shard: Shard, image_field: str | None = None, key_field: str | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES, retries: int = 3,
):
    """Yield every sample of a shard, then exactly one ShardEnd (`unreadable` when even
    `retries` retries of a transient failure did not read it); no member or file over
    `max_bytes` is ever read into memory (it becomes an error row)."""
    if shard.format == "webdataset":
        return read_webdataset(shard, image_field, max_bytes, retries)
    if shard.format == "parquet":
        return read_parquet(shard, image_field, key_field, max_bytes, retries)
    if shard.format == "folder":
        return read_folder(shard, max_bytes)
    raise ValueError(f"unknown shard format {shard.format}")
