"""Peak memory of reading and decoding the issue's bombs: each must stay far below 1.5 GB.

Builds, in a temporary folder, the three inputs that used to take 4.5 GB / 4.5 GB / 3.8 GB:

- `zeros.tgz`: ~2 MB of gzip holding one 2 GiB member of zeros (named .jpg);
- `sparse.tar`: ~10 KB, one GNU sparse member claiming 2 GiB;
- `icon.tar`: an ICO whose one frame is a 30000x30000 PNG (~110 KB).

Each is then read and decoded the way a decoder process does it (sources.read_shard with
the default byte cap, decode_image with the default pixel limit) in a fresh child
process, which reports its own peak RSS (ru_maxrss). Prints a table; `--json` writes it.

    python benchmarks/bomb_memory.py --json benchmarks/results/bomb-memory-devbox.json
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
LIMIT_BYTES = 1.5e9


def _tar_header(name: str, size: int, kind: bytes = b"0", sparse: tuple[tuple[int, int], ...] = (), real: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))[:512]
    block[156:157] = kind
    for index, (offset, length) in enumerate(sparse):  # old GNU sparse map: 4 (offset, numbytes) pairs at 386
        block[386 + 24 * index : 398 + 24 * index] = f"{offset:011o}\0".encode()
        block[398 + 24 * index : 410 + 24 * index] = f"{length:011o}\0".encode()
    if kind == b"S":
        block[483:495] = f"{real:011o}\0".encode()
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def zero_member_tgz(path: Path, member_size: int = 2 * GIB) -> Path:
    """A .tgz of one member of `member_size` zeros, written without ever holding it: after
    its header the whole tar stream is zeros, compressed once per MiB and repeated."""
    header = _tar_header("zeros.jpg", member_size)
    tail = 1024 + (-member_size) % 512  # padding and the end-of-archive blocks: zeros too
    total = len(header) + member_size + tail
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(2**20)
    with open(path, "wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")
        out.write(packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH))
        first = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
        repeat = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)  # same bytes from here on
        out.write(first)
        zeros, crc = total - len(header), zlib.crc32(header)
        crc = zlib.crc32(chunk, crc)
        for _ in range(zeros // len(chunk) - 1):
            out.write(repeat)
            crc = zlib.crc32(chunk, crc)
        rest = bytes(zeros % len(chunk))
        out.write(packer.compress(rest) + packer.flush())
        crc = zlib.crc32(rest, crc)
        out.write(struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF))
    return path


def sparse_tar(path: Path, real_size: int = 2 * GIB) -> Path:
    """A tar whose one GNU sparse member stores 512 bytes but expands to `real_size`."""
    data = b"\xff\xd8\xff" + bytes(509)
    header = _tar_header("sparse.jpg", 512, b"S", sparse=((real_size - 512, 512),), real=real_size)
    path.write_bytes(header + data + bytes(10240 - 1024))
    return path


def png_1bit(side: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = bytes(1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.compress(row * (side % 1000))
    pixels += packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def ico_with_png(side: int = 30000) -> bytes:
    """An ICO whose directory says 256x256 and whose one frame is a side x side PNG."""
    png = png_1bit(side)
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def ico_tar(path: Path) -> Path:
    data = ico_with_png()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("icon.ico")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return path


BUILDERS = {"zeros.tgz": zero_member_tgz, "sparse.tar": sparse_tar, "icon.tar": ico_tar}


def measure_child(path: str) -> None:
    """Child process: read and decode one shard as a decoder does; print JSON with the peak RSS."""
    import resource

    sys.path.insert(0, str(REPO))
    from dvl_batch.preprocess.images import ImageError, decode_image
    from dvl_batch.records import RawSample, Shard
    from dvl_batch.sources import read_shard

    started = time.perf_counter()
    errors = []
    for item in read_shard(Shard("bomb", path, "webdataset")):
        if not isinstance(item, RawSample):
            continue
        if item.error:
            errors.append(item.error)
        for data in item.images:
            try:
                decode_image(data, 89_478_485)
            except ImageError as exc:
                errors.append(str(exc))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "seconds": time.perf_counter() - started, "errors": errors}))


def run(folder: Path) -> list[dict]:
    results = []
    for name, build in BUILDERS.items():
        path = build(folder / name)
        child = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, timeout=600)
        if child.returncode != 0:
            raise SystemExit(f"{name}: {child.stderr.strip().splitlines()[-1]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append({"input": name, "file_bytes": path.stat().st_size, **result})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_child(args.child)
        return
    with tempfile.TemporaryDirectory() as folder:
        results = run(Path(folder))
    print("| input | file size | peak RSS | seconds | row error |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['input']} | {r['file_bytes'] / 1e6:.2f} MB | {r['peak_rss_bytes'] / 1e6:.0f} MB | "
              f"{r['seconds']:.1f} | {(r['errors'] or ['-'])[0][:70]} |")
    if args.json:
        args.json.write_text(json.dumps({"limit_bytes": LIMIT_BYTES, "results": results}, indent=2) + "\n")
    if any(r["peak_rss_bytes"] >= LIMIT_BYTES for r in results):
        raise SystemExit("peak RSS over 1.5 GB")


if __name__ == "__main__":
    main()
