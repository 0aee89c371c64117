"""Plain image folders: a shard is a chunk of files (listed at discovery), one image each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..records import RawSample, Shard, ShardEnd


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
