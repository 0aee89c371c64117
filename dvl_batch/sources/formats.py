"""What every reader shares: file kinds, opening a local or remote stream, the shard-error row."""

from __future__ import annotations

import errno
import io
import subprocess

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


def shard_error_sample(message: str) -> RawSample:
    """The single row that says a shard could not be read at all (so it is not silently empty)."""
    return RawSample(key=SHARD_ROW_KEY, index=0, error=message)
