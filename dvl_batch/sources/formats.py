"""What every reader shares: file kinds, opening a local or remote stream, the shard-error row,
bounded reads, bytes-safe keys and the per-shard key registry that keeps keys distinct."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import subprocess

from ..records import RawSample, Shard, ShardEnd

IMAGE_EXTENSIONS = (
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jp2", "img", "image",
    "avif", "jfif", "tga", "ico",
)
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
SHARD_ROW_KEY = "__shard__"  # key of the single row that reports an unreadable shard
DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # a member, file or parquet value above this becomes an error row


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


class TransientReadError(OSError):
    """A read that may work when tried again: a failing `pipe:` command, a network error, EIO."""


TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.ESTALE}


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientReadError, TimeoutError, ConnectionError)) or (
        isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)


class CommandStream(io.RawIOBase):
    """stdout of a shell command (`pipe:CMD`, or curl for http(s)); a non-zero exit at the
    end of its output raises TransientReadError with one readable line."""

    def __init__(self, command: str | list[str], label: str):
        self.label = label
        self.proc = subprocess.Popen(command, shell=isinstance(command, str), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.proc.stdout.readinto(buffer)
        if not count:
            self._check()
        return count

    def _check(self) -> None:
        code = self.proc.wait()
        if code != 0:
            lines = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            detail = f": {lines[-1][:200]}" if lines else ""
            raise TransientReadError(f"{self.label} failed (exit {code}){detail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        super().close()


def open_stream(url: str):
    if url.startswith("pipe:"):
        return io.BufferedReader(CommandStream(url[5:], f"command '{url[5:]}'"), 1 << 16)
    if url.startswith(("http://", "https://")):
        command = ["curl", "--connect-timeout", "30", "--fail", "--silent", "--show-error", "--location", url]
        return io.BufferedReader(CommandStream(command, f"download of {url}"), 1 << 16)
    if is_remote(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def unreadable_end(shard: Shard, delivered: int, retried: int, problem: str) -> ShardEnd:
    """The end of a shard that failed every try (`retried` retries after the first): no part is
    written, the next run tries again."""
    tries = f"{retried + 1} attempts" if retried else "1 attempt"
    return ShardEnd(shard, delivered, partial=True, unreadable=True, message=f"could not be read ({tries}): {problem}")


def shard_error_sample(message: str) -> RawSample:
    """The single row that says a shard could not be read at all (so it is not silently empty)."""
    return RawSample(key=SHARD_ROW_KEY, index=0, error=message)


def too_large(size: int, limit: int) -> str:
    return f"file too large: {size:,} bytes exceeds the limit of {limit:,} (--max-file-bytes)"


def read_regular_file(path: str | os.PathLike, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` of them, never blocking on a FIFO or a device.

    Opened non-blocking and checked with fstat before reading, so a FIFO named m.jpg (or
    /dev/zero behind a symlink) is refused at once. Raises OSError with a readable strerror.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file (FIFO, device or socket); skipped")
        if info.st_size > limit:
            raise OSError(0, too_large(info.st_size, limit))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise OSError(0, too_large(len(data), limit))
        return data
    finally:
        os.close(fd)


def safe_text(text: str) -> str:
    """`text` unchanged when it is valid Unicode; lone surrogates (undecodable name bytes,
    kept by surrogateescape) become `\\xNN` escapes, so parquet can store it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


def name_of_key(key: str) -> str:
    """The file-system name (surrogateescape form) a `safe_text` key was made from.

    Only keys holding `\\xNN` escapes are changed: a name that really contains that
    text and is valid UTF-8 is not told apart (the key registry reports such clashes).
    """
    if not _ESCAPE.search(key):
        return key
    raw = _ESCAPE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)) if int(m.group(1), 16) >= 0x80 else m.group(0), key)
    return raw


class KeyRegistry:
    """Makes the keys of one shard distinct: a key seen before gets `#2`, `#3`, ... appended.

    Two samples are never merged into one and never share a key; `duplicates` counts the
    renamed ones for the part's metadata, the summary and `inspect`.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.duplicates = 0
        self.examples: list[str] = []

    def unique(self, key: str) -> str:
        key = safe_text(key)
        if key not in self.seen:
            self.seen.add(key)
            return key
        self.duplicates += 1
        if len(self.examples) < 3:
            self.examples.append(key)
        n = 2
        while f"{key}#{n}" in self.seen:
            n += 1
        renamed = f"{key}#{n}"
        self.seen.add(renamed)
        return renamed

    def note(self) -> str | None:
        if not self.duplicates:
            return None
        return f"{self.duplicates} duplicate keys renamed KEY#N (e.g. {', '.join(self.examples)})"
