"""Rebuild the bundled example inputs from examples/images/.

Writes the same six real photographs (CC0 / public domain, from scikit-image's sample
data; see images/README.md) in the three input layouts dvl-batch reads:

- shards/examples-000000.tar  a webdataset shard: <key>.jpg|png, <key>.txt (a question), <key>.json
- parquet/examples.parquet    HF-datasets style: key, image {bytes, path}, question
- images/                     a plain folder (used as is)
- pairs/pairs-000000.tar      multi-image webdataset: <key>.0.<ext> and <key>.1.<ext> per sample
- pairs/pairs.parquet         the same pairs as a parquet list column `images` of {bytes, path}

Run: python examples/make_examples.py
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
QUESTIONS = {
    "astronaut": "What is the person wearing?",
    "camera": "What is the man holding?",
    "chelsea": "What animal is this?",
    "coffee": "What drink is in the cup?",
    "logo": "Is there any text in the image?",
    "rocket": "What is happening in this picture?",
}


PAIRS = {"space": ("astronaut", "rocket"), "kitchen": ("chelsea", "coffee"), "studio": ("camera", "logo")}
PAIR_QUESTION = "What do <image> and <image> have in common?"


def _images() -> list[Path]:
    return sorted(p for p in (HERE / "images").iterdir() if p.suffix in (".jpg", ".png"))


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))


def write_shard(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for image in _images():
            key = image.stem
            _add(archive, f"{key}{image.suffix}", image.read_bytes())
            _add(archive, f"{key}.txt", QUESTIONS[key].encode())
            _add(archive, f"{key}.json", json.dumps({"source": image.name, "question": QUESTIONS[key]}).encode())


def write_parquet(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = _images()
    table = pa.table(
        {
            "key": [p.stem for p in images],
            "image": [{"bytes": p.read_bytes(), "path": p.name} for p in images],
            "question": [QUESTIONS[p.stem] for p in images],
        }
    )
    pq.write_table(table, path)


def _image_path(stem: str) -> Path:
    return next(p for p in _images() if p.stem == stem)


def write_pairs_shard(path: Path) -> None:
    """Two images per sample: the image order is the member order KEY.0, KEY.1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key, stems in PAIRS.items():
            for position, stem in enumerate(stems):
                image = _image_path(stem)
                _add(archive, f"{key}.{position}{image.suffix}", image.read_bytes())
            _add(archive, f"{key}.txt", PAIR_QUESTION.encode())


def write_pairs_parquet(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "key": list(PAIRS),
            "images": [[{"bytes": _image_path(s).read_bytes(), "path": _image_path(s).name} for s in stems] for stems in PAIRS.values()],
            "question": [PAIR_QUESTION for _ in PAIRS],
        }
    )
    pq.write_table(table, path)


def write_questions(path: Path) -> None:
    lines = [json.dumps({"key": k, "questions": [q, "Describe this image in one sentence."]}) for k, q in QUESTIONS.items()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_shard(HERE / "shards" / "examples-000000.tar")
    write_parquet(HERE / "parquet" / "examples.parquet")
    write_questions(HERE / "questions.jsonl")
    write_pairs_shard(HERE / "pairs" / "pairs-000000.tar")
    write_pairs_parquet(HERE / "pairs" / "pairs.parquet")
    print("wrote examples/shards, examples/parquet, examples/pairs and examples/questions.jsonl")
