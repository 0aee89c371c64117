"""Shared fixtures: the offline tiny models, real example images, shard builders, CLI runner."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
IMAGES = EXAMPLES / "images"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tiny-model cache for the whole session (in-process and subprocess tests)."""
    path = Path(os.environ.get("DVL_BATCH_TEST_CACHE") or tmp_path_factory.mktemp("dvl-cache"))
    os.environ["DVL_BATCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir) -> Path:
    from dvl_batch.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir)


@pytest.fixture(scope="session")
def tiny_hybrid_dir(cache_dir) -> Path:
    from dvl_batch.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir, hybrid=True)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def example_images() -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(IMAGES.iterdir()) if p.suffix in (".jpg", ".png")}


def write_tar(path: Path, members: list[tuple[str, bytes]], gzip: bool = False) -> Path:
    """A webdataset shard from (member name, bytes) pairs, in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gzip else "w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_image_shard(path: Path, images: dict[str, bytes], extra: dict[str, dict[str, bytes]] | None = None) -> Path:
    members: list[tuple[str, bytes]] = []
    for key, data in images.items():
        ext = "png" if data[:4] == b"\x89PNG" else "jpg"
        members.append((f"{key}.{ext}", data))
        for field, value in (extra or {}).get(key, {}).items():
            members.append((f"{key}.{field}", value))
    return write_tar(path, members)


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def many_shards(folder: Path, n_shards: int, per_shard: int) -> list[Path]:
    """n_shards webdataset shards cycling through the example photos; keys are unique."""
    photos = list(example_images().values())
    paths = []
    for s in range(n_shards):
        images = {f"s{s:03d}_{i:03d}": photos[(s * per_shard + i) % len(photos)] for i in range(per_shard)}
        paths.append(write_image_shard(folder / f"shard-{s:06d}.tar", images))
    return paths


def read_rows(out: Path):
    """All rows of all parts of an output folder, as a pyarrow table."""
    parts = sorted((Path(out) / "parts").glob("*.parquet"))
    if not parts:
        return pa.table({"key": pa.array([], pa.string())})
    return pa.concat_tables([pq.read_table(p) for p in parts])


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        DVL_BATCH_CACHE=str(cache_dir),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(args: list[str], cache_dir: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m dvl_batch ARGS` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "dvl_batch", *args],
        env=cli_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_cli(args: list[str], cache_dir: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dvl_batch", *args],
        env=cli_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def job_json(out: Path) -> dict:
    return json.loads((Path(out) / "job.json").read_text())
