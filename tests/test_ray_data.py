"""Ray Data interop: ImageAnswerer gives the CLI's answers, and runs inside map_batches."""

from __future__ import annotations

import pandas as pd
import pytest

from dvl_batch.ray_data import ImageAnswerer, image_bytes
from dvl_batch.records import RawSample
from dvl_batch.sources import discover_shards, read_shard

from .conftest import EXAMPLES, read_rows, run_cli


def _example_batch() -> dict[str, list]:
    (shard,) = discover_shards([str(EXAMPLES / "shards")], 1000)
    samples = [s for s in read_shard(shard) if isinstance(s, RawSample)]
    return {"key": [s.key for s in samples], "image": [s.images[0] for s in samples]}


def test_image_column_cells():
    assert image_bytes(b"abc") == [b"abc"]
    assert image_bytes({"bytes": b"abc", "path": None}) == [b"abc"]
    assert image_bytes([b"a", {"bytes": b"b"}]) == [b"a", b"b"]
    assert image_bytes(None) == []


def test_answers_equal_the_cli_and_bad_rows_become_error_rows(tmp_path, cache_dir):
    out = tmp_path / "out"
    cli = run_cli(["caption", str(EXAMPLES / "shards"), "-o", str(out), "--model", "tiny", "--max-new-tokens", "6",
                   "--workers", "0", "--no-progress"], cache_dir)
    assert cli.returncode == 0, cli.stderr
    expected = read_rows(out).to_pandas().set_index("key")["answer"]

    answerer = ImageAnswerer("tiny", max_new_tokens=6, key_column="key", device="cpu", cache_dir=str(cache_dir),
                             decode_threads=2)
    batch = _example_batch()
    batch["key"].append("broken")
    batch["image"].append(b"not an image")
    result = pd.DataFrame(answerer(batch)).set_index("key")
    assert list(result.columns) == ["question_index", "question", "answer", "prompt_tokens", "generated_tokens",
                                    "finish_reason", "error"]
    assert result.loc["broken", "finish_reason"] == "error" and pd.isna(result.loc["broken", "answer"])
    assert result.drop(index="broken")["answer"].to_dict() == expected.to_dict()


@pytest.mark.slow
def test_vqa_rows_per_question_inside_ray_data_map_batches(cache_dir):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    batch = _example_batch()
    items = [{"key": k, "image": im, "q": f"What is {k}?"} for k, im in zip(batch["key"], batch["image"], strict=True)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        answers = ray.data.from_items(items).map_batches(
            ImageAnswerer,
            fn_constructor_kwargs={"model": "tiny", "questions": ["Describe."], "question_column": "q",
                                   "key_column": "key", "max_new_tokens": 4, "device": "cpu",
                                   "cache_dir": str(cache_dir)},
            batch_size=4, concurrency=1, num_cpus=1,
        ).to_pandas()
    finally:
        ray.shutdown()
    assert len(answers) == 12 and set(answers["key"]) == set(batch["key"])
    assert sorted(answers[answers["key"] == "chelsea"]["question"]) == ["Describe.", "What is chelsea?"]
    assert answers["error"].isna().all() and (answers["generated_tokens"] >= 1).all()
