"""Plain image folders: a shard is a chunk of files (listed at discovery), one image each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..records import RawSample, Shard, ShardEnd
from .formats import DEFAULT_MAX_FILE_BYTES, KeyRegistry, read_regular_file


def read_folder(shard: Shard, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[RawSample | ShardEnd]:
    """One sample per listed file; the key is the relative path (`\\xNN` for undecodable bytes).

    Only regular files are read, at most `max_bytes` of each: a FIFO or device that took a
    listed name since discovery is an error row, never a blocked read."""
    root = Path(shard.url)
    keys = KeyRegistry()
    for index, name in enumerate(shard.members):
        key = keys.unique(name)
        sample = RawSample(key=key, index=index, field_names=("file",), image_names=("file",))
        try:
            sample.images = [read_regular_file(root / name, max_bytes)]
        except OSError as exc:
            sample.error = f"cannot read file: {exc.strerror or exc}"
        yield sample
    yield ShardEnd(shard, len(shard.members), message=keys.note(), duplicate_keys=keys.duplicates)
