"""The 7B hybrid (SigLIP 384px + SAM 1024px) through the whole pipeline, on the tiny hybrid."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dvl_batch.api import run
from dvl_batch.config.spec import JobSpec
from dvl_batch.preprocess.images import decode_image, normalize_pixels, render_views, views_from_image_processor
from dvl_batch.runtime.progress import NullReporter

from .cli_processes import Overlapped
from .conftest import EXAMPLES, cli_env, example_images, job_json, read_rows

FAST = ["--model", "tiny-hybrid", "--max-new-tokens", "6", "--workers", "0", "--no-progress"]


def _synthetic(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * 7 + height)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hybrid_processor(tiny_hybrid_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_hybrid_dir)


def test_views_are_high_res_first_and_low_res_derived_from_it(hybrid_processor):
    high, low = views_from_image_processor(hybrid_processor.image_processor)
    assert (high.name, high.size, high.source) == ("high_res_pixel_values", 1024, None)
    assert (low.name, low.size, low.source) == ("pixel_values", 384, "high_res_pixel_values")
    assert high.background == (122, 116, 104) and low.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", ["chelsea", "rocket", "logo", "wide", "tall", "sliver"])
def test_views_equal_the_hybrid_processor_bit_for_bit(hybrid_processor, name):
    odd = {"wide": _synthetic(1500, 301), "tall": _synthetic(97, 2000), "sliver": _synthetic(3000, 12)}
    data = odd.get(name) or example_images()[name]
    image = decode_image(data, 10**9)
    views = views_from_image_processor(hybrid_processor.image_processor)
    ours = render_views(image, views)
    reference = hybrid_processor.image_processor(image, return_tensors="pt")
    for view in views:
        normalized = normalize_pixels(torch.from_numpy(ours[view.name])[None], view, torch.float32)
        assert torch.equal(normalized, reference[view.name]), view.name


def test_cli_caption_vqa_and_multi_image_with_the_hybrid(tmp_path, cache_dir, tiny_hybrid_dir):
    caption, vqa = tmp_path / "caption", tmp_path / "vqa"
    vqa_args = ["vqa", str(EXAMPLES / "pairs" / "pairs-000000.tar"), "-o", str(vqa), "-q",
                "Which of <image> and <image> is brighter?", "--question-field", "txt", *FAST]
    both = Overlapped({  # two runs that share nothing but the (built) tiny hybrid: side by side
        "caption": ([sys.executable, "-m", "dvl_batch", "caption", str(EXAMPLES / "shards"), "-o", str(caption), *FAST],
                    cli_env(cache_dir), 300),
        "vqa": ([sys.executable, "-m", "dvl_batch", *vqa_args], cli_env(cache_dir), 300),
    })
    try:
        result = both.result("caption")
        assert result.returncode == 0, result.stderr
        rows = read_rows(caption).to_pandas()
        assert len(rows) == 6 and rows["error"].isna().all() and (rows["prompt_tokens"] > 576).all()
        assert job_json(caption)["model"].startswith("tiny-hybrid:")

        result = both.result("vqa")
    finally:
        both.close()
    assert result.returncode == 0, result.stderr
    rows = read_rows(vqa).to_pandas()
    assert len(rows) == 3 * 2 and rows["error"].isna().all(), rows["error"].dropna().tolist()
    assert (rows["prompt_tokens"] > 2 * 576).all()


def test_hybrid_engines_and_decoders_agree(tmp_path, cache_dir):
    """Slot vs generate engine, fast (uint8 + device normalisation) vs exact (processor) decode."""
    answers = {}
    for engine, fast in [("continuous", True), ("generate", True), ("continuous", False)]:
        spec = JobSpec.from_recipe(
            "compare-images", inputs=str(EXAMPLES / "pairs" / "pairs.parquet"), output=str(tmp_path / f"{engine}-{fast}"),
            model="tiny-hybrid", engine=engine, fast_decode=fast, max_new_tokens=8, workers=0, progress=False,
        )
        result = run(spec, reporter=NullReporter(), cache_dir=cache_dir, offline=True, say=lambda text: None)
        rows = read_rows(result.out).to_pandas().sort_values(["shard", "key"])
        assert rows["error"].isna().all()
        answers[(engine, fast)] = rows["answer"].tolist()
    assert answers[("continuous", True)] == answers[("generate", True)] == answers[("continuous", False)]
