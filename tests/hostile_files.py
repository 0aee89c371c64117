"""Hostile inputs for the reliability tests: odd but real image files, broken ones, and shards
that are cut short or carry dangerous member names. Built in memory with Pillow, except the
decompression bomb, whose header is written by hand (its pixels would not fit in memory).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .conftest import image_bytes, write_tar

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def animated_gif() -> bytes:
    """Three frames, red then green then blue; the first frame is the one used."""
    frames = [Image.new("RGB", (32, 24), color) for color in (RED, GREEN, BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    """Two pages, red then blue; the first page is the one used."""
    pages = [Image.new("RGB", (30, 20), RED), Image.new("RGB", (30, 20), BLUE)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")  # red in CMYK


def png_16bit() -> bytes:
    """A 16-bit greyscale gradient, 0 at the left to 65535 at the right."""
    row = [int(65535 * x / 63) for x in range(64)]
    image = Image.new("I;16", (64, 16))
    image.putdata(row * 16)
    return encode(image, "PNG")


def palette_with_transparency() -> bytes:
    """Palette image: left half transparent (index 0), right half red (index 1)."""
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    for x in range(10, 20):
        for y in range(10):
            image.putpixel((x, y), 1)
    return encode(image, "PNG", transparency=0)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def solid_png(width: int, height: int, color=RED) -> bytes:
    return encode(Image.new("RGB", (width, height), color), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20 with the left half red and the right half blue, EXIF orientation 6
    (rotate 90 degrees clockwise to display): shown upright it is 20x40, red on top."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


@dataclass(frozen=True)
class Hostile:
    """A hostile image and what must become of it: decoded to `size`, or an error row saying `error`."""

    name: str  # webdataset member name
    data: bytes
    size: tuple[int, int] | None = None
    error: str | None = None


def hostile_images(pixel_limit: int) -> list[Hostile]:
    """Every hostile image of the issue, with its expected fate under `pixel_limit`."""
    photo, png = image_bytes("chelsea.jpg"), image_bytes("camera.png")
    over_limit = int(pixel_limit**0.5) + 50
    return [
        Hostile("empty.jpg", b"", error="empty file"),
        Hostile("cutjpeg.jpg", photo[: len(photo) // 2], error="truncated"),
        Hostile("cutpng.png", png[: len(png) // 2], error="truncated"),
        Hostile("text.jpg", b"Just some text, renamed to .jpg\n" * 10, error="not an image"),
        Hostile("anim.gif", animated_gif(), size=(32, 24)),
        Hostile("pages.tiff", multipage_tiff(), size=(30, 20)),
        Hostile("cmyk.jpg", cmyk_jpeg(), size=(40, 30)),
        Hostile("deep.png", png_16bit(), size=(64, 16)),
        Hostile("palette.png", palette_with_transparency(), size=(20, 10)),
        Hostile("bomb.png", png_header_only(100_000, 100_000), error="image too large"),
        Hostile("overlimit.png", solid_png(over_limit, over_limit), error=f"exceeds the limit of {pixel_limit}"),
        Hostile("dot.png", solid_png(1, 1), size=(1, 1)),
        Hostile("tall.png", solid_png(1, 5000), size=(1, 5000)),
        Hostile("wide.png", solid_png(5000, 1), size=(5000, 1)),
        Hostile("rotated.jpg", exif_rotated_jpeg(), size=(20, 40)),
    ]


UNSAFE_NAMES = ("/abs/evil.jpg", "../evil.jpg", "nested/../../evil.jpg")


def unsafe_names_shard(path: Path) -> Path:
    """Good samples around members whose names are absolute or climb out with `..`."""
    photo = image_bytes("coffee.jpg")
    members = [("before.jpg", photo)] + [(name, photo) for name in UNSAFE_NAMES] + [("after.jpg", photo)]
    return write_tar(path, members)


def cut_tar(path: Path, keys: list[str], cut_in_member: int, gzip_it: bool = False) -> Path:
    """A shard of example photos cut half-way through the data of member `cut_in_member`."""
    photos = [image_bytes(n) for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    whole = write_tar(path.with_suffix(".whole"), [(f"{k}.jpg", photos[i % 4]) for i, k in enumerate(keys)])
    with tarfile.open(whole) as archive:
        member = archive.getmembers()[cut_in_member]
    data = whole.read_bytes()[: member.offset_data + member.size // 2]
    whole.unlink()
    if gzip_it:  # a .tgz download cut at that point: no final deflate block, no gzip trailer
        packer = zlib.compressobj(6, zlib.DEFLATED, 31)
        data = packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH)
    path.write_bytes(data)
    return path


def cut_at_member_boundary(path: Path, keys: list[str], keep: int) -> Path:
    """A shard that ends cleanly after `keep` members but lacks the tar end-of-archive block."""
    photos = [image_bytes(n) for n in ("astronaut.jpg", "chelsea.jpg")]
    whole = write_tar(path.with_suffix(".whole"), [(f"{k}.jpg", photos[i % 2]) for i, k in enumerate(keys)])
    with tarfile.open(whole) as archive:
        member = archive.getmembers()[keep]
    path.write_bytes(whole.read_bytes()[: member.offset])
    whole.unlink()
    return path
