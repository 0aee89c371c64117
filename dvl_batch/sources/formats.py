"""What every reader shares: file kinds, opening a local or remote stream, the shard-error row."""

from __future__ import annotations

from ..records import RawSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jp2", "img", "image")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
SHARD_ROW_KEY = "__shard__"  # key of the single row that reports an unreadable shard


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def format_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "webdataset"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def open_stream(url: str):
    if is_remote(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def shard_error_sample(message: str) -> RawSample:
    """The single row that says a shard could not be read at all (so it is not silently empty)."""
    return RawSample(key=SHARD_ROW_KEY, index=0, error=message)
