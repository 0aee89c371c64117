"""The benchmark's inputs: profile caption-varlen's JPEG shards, questions and stop schedule.

~1024px JPEGs cut from the real example photos (every image differs), written once as
webdataset shards and reused; request i is forced to stop after 16 + (i*37 % 113)
tokens, since random weights never choose EOS by themselves.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VQA_QUESTIONS = (
    "What is the main subject of this image?",
    "What colours dominate the picture?",
    "Is this photo taken indoors or outdoors?",
    "How many people are visible?",
    "What is happening in the background?",
)
# A system prompt that makes the tiny tokenizer's caption prompt 616 tokens, like the real one's.
BENCH_SYSTEM_PROMPT = "You are a helpful language and vision assistant. Describe what you see in the image here."


def stop_after(index: int) -> int:
    """The profile's stop schedule: request i ends with EOS as token number 16 + (i*37 % 113)."""
    return 16 + (index * 37) % 113


def key_index(key: str) -> int:
    return int(key.rsplit("-", 1)[-1])


def _render_jpeg(args: tuple[int, int, list[bytes]]) -> tuple[str, bytes]:
    """A ~side-px JPEG: a crop of a real photo, resized and jittered so every image differs."""
    from PIL import Image, ImageEnhance

    index, side, sources = args
    base = Image.open(io.BytesIO(sources[index % len(sources)])).convert("RGB")
    w, h = base.size
    crop = 0.6 + 0.4 * ((index * 7919) % 97) / 96
    cw, ch = int(w * crop), int(h * crop)
    left, top = (index * 31) % max(1, w - cw + 1), (index * 17) % max(1, h - ch + 1)
    image = base.crop((left, top, left + cw, top + ch))
    aspect = image.width / image.height
    size = (side, max(1, int(side / aspect))) if aspect >= 1 else (max(1, int(side * aspect)), side)
    image = image.resize(size, Image.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(0.8 + 0.4 * ((index * 13) % 11) / 10)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return f"img-{index:07d}", buffer.getvalue()


def make_jpeg_shards(folder: Path, count: int, per_shard: int, side: int, workers: int) -> list[Path]:
    """Webdataset shards of `count` JPEGs (cached: reused when already complete)."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"complete-{count}-{per_shard}-{side}.json"
    n_shards = -(-count // per_shard)
    paths = [folder / f"bench-{s:06d}.tar" for s in range(n_shards)]
    if marker.exists():
        return paths
    sources = [p.read_bytes() for p in sorted((Path(__file__).resolve().parents[2] / "examples" / "images").glob("*.jpg"))]
    if not sources:
        raise RuntimeError("benchmark needs examples/images/*.jpg")
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        rendered = list(pool.map(_render_jpeg, [(i, side, sources) for i in range(count)], chunksize=16))
    for s, path in enumerate(paths):
        with tarfile.open(path, "w") as archive:
            for key, data in rendered[s * per_shard : (s + 1) * per_shard]:
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    marker.write_text(json.dumps({"count": count}))
    return paths
