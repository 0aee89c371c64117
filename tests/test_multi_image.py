"""Multi-image prompts: sources, rendering, truncation and engine parity with generate.

Conversations with two or three images are batched together with single-image ones
of different lengths (and with earlier chat turns); both engines must give exactly
the tokens of transformers' `generate` run on one prompt at a time.
"""

from __future__ import annotations

import pytest
import torch

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.generate import GenerateEngine
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.types import EnginePrompt, WorkItem
from dvl_batch.preprocess.images import decode_image, normalize_pixels, render_views, views_from_image_processor
from dvl_batch.preprocess.prompts import PromptRenderer
from dvl_batch.records import RawSample, Shard
from dvl_batch.sources import discover_shards, read_shard
from dvl_batch.sources.webdataset import pick_image_fields

from .conftest import EXAMPLES, example_images, read_rows, run_cli, write_parquet, write_tar
from .test_engine_parity import generate_references

MAX_NEW = 12
TURNS = (("user", "Answer in a few words."), ("assistant", "Understood."))

# (image names, question, turns): mixed counts, marker and no-marker layouts, lengths.
CASES = [
    (["astronaut", "rocket"], "What is the difference between <image> and <image>?", ()),
    (["chelsea"], "Describe this image.", ()),
    (["coffee", "camera", "logo"], "Which of these three pictures shows a drink?", ()),
    (["rocket"], "How many people are there? Answer briefly, and say where they are.", TURNS),
    (["logo", "chelsea"], "<image> Is the first image a logo? <image> And the second one?", TURNS),
    (["camera"], "Read the text.", ()),
]


def _pixels(processor, names):
    views = views_from_image_processor(processor.image_processor)
    photos = example_images()
    rendered = [render_views(decode_image(photos[n], 10**9), views) for n in names]
    return {v.name: torch.stack([torch.from_numpy(r[v.name]) for r in rendered]) for v in views}, views


def _items(processor, cases=CASES):
    items, views = [], None
    for uid, (names, question, turns) in enumerate(cases):
        pixels, views = _pixels(processor, names)
        tokenized = PromptRenderer(processor, None, turns).tokenize(question, len(names))
        items.append(WorkItem(uid, pixels, [EnginePrompt(0, tokenized.input_ids, tokenized.prefix_len)]))
    return items, views


@pytest.fixture(scope="module")
def mixed_case(tiny_model, tiny_processor):
    items, views = _items(tiny_processor)
    eos = tiny_processor.tokenizer.eos_token_id
    return items, views, generate_references(tiny_model, views, items, eos, max_new=MAX_NEW), eos


def test_prompt_ids_and_pixels_equal_the_processors_own(tiny_processor):
    """Our rendering of a two-image conversation is exactly what DeepseekVLProcessor builds."""
    names, question, _ = CASES[0]
    photos = example_images()
    images = [decode_image(photos[n], 10**9) for n in names]
    renderer = PromptRenderer(tiny_processor, None)
    text = renderer.render(question, len(names))
    reference = tiny_processor(text=text, images=images, return_tensors="pt")
    ours = renderer.tokenize(question, len(names))
    assert ours.input_ids == reference["input_ids"][0].tolist()
    pixels, views = _pixels(tiny_processor, names)
    normalized = normalize_pixels(pixels["pixel_values"], views[0], torch.float32)
    assert torch.equal(normalized, reference["pixel_values"])
    image_positions = [i for i, t in enumerate(ours.input_ids) if t == renderer.image_token_id]
    assert len(image_positions) == 2 * 576 and ours.prefix_len == image_positions[-1] + 1


@pytest.mark.parametrize("batch_size,prefill_batch", [(None, None), (2, 1), (4, 3)])
def test_slot_engine_matches_generate_on_mixed_multi_image_batch(tiny_model, mixed_case, batch_size, prefill_batch):
    items, views, refs, eos = mixed_case
    engine = SlotEngine(
        VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=MAX_NEW),
        BatchSpec(batch_size=batch_size, prefill_batch=prefill_batch), [eos], eos,
    )
    calls = []
    original = engine.vlm.image_features
    engine.vlm.image_features = lambda pixels, **kw: calls.append(next(iter(pixels.values())).shape[0]) or original(pixels, **kw)
    got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert got == refs
    assert sum(calls) == sum(len(names) for names, _, _ in CASES), "every image is encoded exactly once"


def test_generate_engine_pads_mixed_lengths_and_image_counts(tiny_model, mixed_case):
    items, views, refs, eos = mixed_case
    engine = GenerateEngine(tiny_model, views, GenerationSpec(max_new_tokens=MAX_NEW), BatchSpec(batch_size=6), [eos], eos)
    got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert got == refs
    lengths = {len(item.prompts[0].input_ids) for item in items}
    assert len(lengths) == len(items), "the batch really mixes prompt lengths"


def test_hybrid_model_multi_image_matches_generate(tiny_hybrid_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_hybrid_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_hybrid_dir).eval()
    items, views = _items(processor, CASES[:3])
    assert {v.name for v in views} == {"pixel_values", "high_res_pixel_values"}
    eos = processor.tokenizer.eos_token_id
    refs = generate_references(model, views, items, eos, max_new=MAX_NEW)
    engine = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=MAX_NEW), BatchSpec(batch_size=2), [eos], eos)
    assert {(c.uid, c.index): c.tokens for c in engine.run(iter(items))} == refs


def test_webdataset_and_parquet_pairs_read_two_images_in_order():
    photos = example_images()
    for shard in discover_shards([str(EXAMPLES / "pairs")], 1000):
        samples = [s for s in read_shard(shard) if isinstance(s, RawSample)]
        assert [s.key for s in samples] == ["space", "kitchen", "studio"], shard.format
        space = samples[0]
        assert space.images == [photos["astronaut"], photos["rocket"]], shard.format
        assert space.error is None


def test_image_field_list_selects_and_orders_fields(tmp_path):
    assert pick_image_fields({"2.jpg": b"", "10.jpg": b"", "1.png": b"", "txt": b""}, None) == ["1.png", "2.jpg", "10.jpg"]
    photos = example_images()
    shard_path = write_tar(
        tmp_path / "s.tar", [("a.left.jpg", photos["chelsea"]), ("a.right.jpg", photos["coffee"]), ("a.thumb.jpg", photos["logo"])]
    )
    shard = Shard("s", str(shard_path), "webdataset")
    (sample, _end) = list(read_shard(shard, image_field="right.jpg,left.jpg"))
    assert sample.images == [photos["coffee"], photos["chelsea"]]


def test_truncation_cuts_question_text_never_image_tokens(tiny_processor):
    question = "What is in this picture? " + "Describe every colour and every object in great detail. " * 6
    full = PromptRenderer(tiny_processor, None).tokenize(question, 2)
    limit = len(full.input_ids) - 40
    renderer = PromptRenderer(tiny_processor, None, max_prompt_tokens=limit)
    cut = renderer.tokenize(question, 2)
    assert len(cut.input_ids) <= limit and cut.truncated_tokens >= 40
    assert cut.input_ids.count(renderer.image_token_id) == 2 * 576
    assert cut.input_ids[: cut.prefix_len] == full.input_ids[: full.prefix_len], "the image prefix is untouched"
    text = tiny_processor.tokenizer.decode(cut.input_ids[cut.prefix_len :])
    assert text.startswith("What is in this picture?") and text.endswith("Assistant:")
    fits = PromptRenderer(tiny_processor, None, max_prompt_tokens=len(full.input_ids)).tokenize(question, 2)
    assert fits.input_ids == full.input_ids and fits.truncated_tokens == 0


def test_truncation_keeps_inline_markers_and_errors_when_images_alone_do_not_fit(tiny_processor):
    question = "Compare <image> with <image> and explain " + "all the differences in detail " * 8
    full = PromptRenderer(tiny_processor, None).tokenize(question, 2)
    renderer = PromptRenderer(tiny_processor, None, max_prompt_tokens=len(full.input_ids) - 20)
    cut = renderer.tokenize(question, 2)
    assert cut.input_ids.count(renderer.image_token_id) == 2 * 576
    assert len(cut.input_ids) <= renderer.max_prompt_tokens
    with pytest.raises(ValueError, match="even without its question text"):
        PromptRenderer(tiny_processor, None, max_prompt_tokens=2 * 576).tokenize(question, 2)


def test_cli_compare_recipe_on_pairs_and_error_rows_for_wrong_image_count(tmp_path, cache_dir):
    out = tmp_path / "out"
    photos = example_images()
    single = write_parquet(
        tmp_path / "data" / "mixed.parquet",
        {
            "key": ["pair", "single"],
            "images": [[{"bytes": photos["chelsea"], "path": "a"}, {"bytes": photos["coffee"], "path": "b"}],
                       [{"bytes": photos["logo"], "path": "c"}]],
        },
    )
    args = ["run", "compare-images", "-i", str(EXAMPLES / "pairs"), "-i", str(single), "-o", str(out),
            "--model", "tiny", "--max-new-tokens", "6", "--workers", "0", "--no-progress", "--max-prompt-tokens", "1300"]
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out).to_pandas().set_index("key")
    assert len(rows) == 8
    ok = rows.drop(index="single")
    assert ok["error"].isna().all() and (ok["prompt_tokens"] > 2 * 576).all() and (ok["prompt_tokens"] <= 1300).all()
    assert "2 <image> markers but the sample has 1 images" in rows.loc["single", "error"]
