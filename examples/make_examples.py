"""Rebuild the bundled example inputs from examples/images/.

Writes the same six real photographs (CC0 / public domain, from scikit-image's sample
data; see images/README.md) in the three input layouts dvl-batch reads:

- shards/examples-000000.tar  a webdataset shard: <key>.jpg|png, <key>.txt (a question), <key>.json
- parquet/examples.parquet    HF-datasets style: key, image {bytes, path}, question
- images/                     a plain folder (used as is)

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


def write_questions(path: Path) -> None:
    lines = [json.dumps({"key": k, "questions": [q, "Describe this image in one sentence."]}) for k, q in QUESTIONS.items()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_shard(HERE / "shards" / "examples-000000.tar")
    write_parquet(HERE / "parquet" / "examples.parquet")
    write_questions(HERE / "questions.jsonl")
    print("wrote examples/shards, examples/parquet and examples/questions.jsonl")
