"""Engine parity: the slot engine and bucketed generate give transformers' own tokens.

Reference = `model.generate` on one sample at a time with the processor's inputs.
Everything runs in float32 on the CPU, where batching does not change the argmax.
"""

from __future__ import annotations

import pytest
import torch

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.generate import ForcedEOS, GenerateEngine, trim_at_eos
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.planning import plan_groups
from dvl_batch.engine.types import EnginePrompt, WorkItem
from dvl_batch.preprocess.images import decode_image, normalize_pixels, render_views, views_from_image_processor
from dvl_batch.preprocess.prompts import PromptRenderer

from .conftest import example_images

QUESTIONS = ["Describe this image.", "What is in the picture?", "How many people are there? Answer briefly.", "Read the text."]
MAX_NEW = 20


def _items(processor, questions_per_item, force=None):
    views = views_from_image_processor(processor.image_processor)
    renderer = PromptRenderer(processor, None)
    items = []
    for uid, data in enumerate(example_images().values()):
        image = decode_image(data, 10**9)
        pixels = {k: torch.from_numpy(v)[None] for k, v in render_views(image, views).items()}
        prompts = []
        for qi, question in enumerate(QUESTIONS[: questions_per_item(uid)]):
            tokenized = renderer.tokenize(question, 1)
            forced = force(uid, qi) if force else None
            prompts.append(EnginePrompt(qi, tokenized.input_ids, tokenized.prefix_len, forced))
        items.append(WorkItem(uid, pixels, prompts))
    return items, views


def generate_references(model, views, items, eos, max_new=MAX_NEW):
    by_name = {v.name: v for v in views}
    refs = {}
    for item in items:
        pixels = {k: normalize_pixels(v, by_name[k], torch.float32) for k, v in item.pixels.items()}
        for prompt in item.prompts:
            ids = torch.tensor([prompt.input_ids])
            kwargs = {}
            if prompt.force_eos_after:
                from transformers import LogitsProcessorList

                kwargs["logits_processor"] = LogitsProcessorList(
                    [ForcedEOS(torch.tensor([prompt.force_eos_after]), ids.shape[1], eos)]
                )
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **pixels, max_new_tokens=max_new,
                do_sample=False, **kwargs,
            )
            refs[(item.uid, prompt.index)] = trim_at_eos(out[0, ids.shape[1] :].tolist(), [eos])[0]
    return refs


@pytest.fixture(scope="module")
def vqa_case(tiny_model, tiny_processor):
    items, views = _items(tiny_processor, lambda uid: 1 + uid % 4)
    eos = tiny_processor.tokenizer.eos_token_id
    return items, views, generate_references(tiny_model, views, items, eos), eos


@pytest.mark.parametrize("batch_size,prefill_batch", [(None, None), (1, 1), (2, 1), (3, 2), (16, 8)])
def test_slot_engine_matches_generate(tiny_model, vqa_case, batch_size, prefill_batch):
    items, views, refs, eos = vqa_case
    engine = SlotEngine(
        VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=MAX_NEW),
        BatchSpec(batch_size=batch_size, prefill_batch=prefill_batch), [eos], eos,
    )
    got = {(c.uid, c.index): c for c in engine.run(iter(items))}
    assert set(got) == set(refs)
    mismatched = [k for k in refs if got[k].tokens != refs[k]]
    assert not mismatched, f"{len(mismatched)} of {len(refs)} answers differ from generate"
    for key, completion in got.items():
        expected_reason = "stop" if refs[key] and refs[key][-1] == eos else "length"
        assert completion.finish_reason == expected_reason
    assert engine.stats.decode_steps > 0


@pytest.mark.parametrize("batch_size", [1, 4, None])
def test_slot_engine_caption_matches_generate(tiny_model, tiny_processor, batch_size):
    """One prompt per image: the whole prompt is prefilled in one right-padded pass."""
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1)
    for item in items[::2]:  # prompts of different lengths in one prefill batch
        item.prompts[0] = EnginePrompt(0, *_tokenize(tiny_processor, "What is in the picture? Answer briefly."))
    refs = generate_references(tiny_model, views, items, eos)
    engine = SlotEngine(
        VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=MAX_NEW), BatchSpec(batch_size=batch_size),
        [eos], eos,
    )
    got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert engine.layout.rows_per_group == 1
    assert got == refs


def _tokenize(processor, question):
    tokenized = PromptRenderer(processor, None).tokenize(question, 1)
    return tokenized.input_ids, tokenized.prefix_len


def test_slot_engine_reuses_image_prefix_per_item(tiny_model, vqa_case):
    items, views, _, eos = vqa_case
    engine = SlotEngine(
        VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=4), BatchSpec(batch_size=8), [eos], eos
    )
    calls = []
    original = engine.vlm.image_features
    engine.vlm.image_features = lambda pixels, **kw: calls.append(next(iter(pixels.values())).shape[0]) or original(pixels, **kw)
    list(engine.run(iter(items)))
    assert sum(calls) == len(items), "each image must be encoded exactly once, whatever its question count"


def test_plan_groups_splits_by_prefix_and_capacity():
    prefix = [1, 2, 3]
    prompts = [EnginePrompt(i, prefix + [10 + i, 20], 3) for i in range(5)]
    groups = plan_groups(WorkItem(0, {}, prompts), rows_per_group=2)
    assert [len(g.prompts) for g in groups] == [2, 2, 1]
    assert all(g.prefix == prefix for g in groups)
    other = EnginePrompt(5, [9, 9, 9, 30], 3)
    groups = plan_groups(WorkItem(0, {}, prompts[:2] + [other]), rows_per_group=4)
    assert sorted(len(g.prompts) for g in groups) == [1, 2]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_generate_engine_bucketed_matches_single(tiny_model, vqa_case, batch_size):
    items, views, refs, eos = vqa_case
    engine = GenerateEngine(
        tiny_model, views, GenerationSpec(max_new_tokens=MAX_NEW), BatchSpec(batch_size=batch_size), [eos], eos
    )
    got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert got == refs


def test_forced_eos_schedule_is_identical_in_both_engines(tiny_model, tiny_processor):
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 2, force=lambda uid, qi: 2 + (uid * 3 + qi) % 5)
    refs = generate_references(tiny_model, views, items, eos, max_new=12)
    slot = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=12), BatchSpec(batch_size=4), [eos], eos)
    slot.stop_schedule = True
    generate = GenerateEngine(tiny_model, views, GenerationSpec(max_new_tokens=12), BatchSpec(batch_size=5), [eos], eos)
    got_slot = {(c.uid, c.index): c.tokens for c in slot.run(iter(items))}
    got_generate = {(c.uid, c.index): c.tokens for c in generate.run(iter(items))}
    assert got_slot == refs == got_generate
    for item in items:
        for prompt in item.prompts:
            tokens = refs[(item.uid, prompt.index)]
            assert len(tokens) <= prompt.force_eos_after and tokens[-1] == eos


def test_hybrid_model_matches_generate(tiny_hybrid_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_hybrid_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_hybrid_dir).eval()
    items, views = _items(processor, lambda uid: 1 + uid % 2)
    items = items[:3]
    eos = processor.tokenizer.eos_token_id
    refs = generate_references(model, views, items, eos, max_new=10)
    engine = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=10), BatchSpec(batch_size=4), [eos], eos)
    got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert got == refs


def test_sampling_is_reproducible_with_seed(tiny_model, vqa_case):
    items, views, _, eos = vqa_case

    def sample(seed):
        gen = GenerationSpec(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=seed)
        engine = SlotEngine(VisionLanguageModel(tiny_model), views, gen, BatchSpec(batch_size=4), [eos], eos)
        return {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again
    assert first != other


def test_prompt_longer_than_model_positions_is_an_error_row(tiny_model, tiny_processor):
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1)
    vlm = VisionLanguageModel(tiny_model)
    engine = SlotEngine(vlm, views, GenerationSpec(max_new_tokens=vlm.max_positions), BatchSpec(batch_size=2), [eos], eos)
    results = list(engine.run(iter(items[:2])))
    assert len(results) == 2
    assert all(r.finish_reason == "error" and "positions" in r.error for r in results)


def test_prefill_reserve_halves_the_prefill_batch_until_it_fits(tiny_model, tiny_processor, monkeypatch):
    """The memory reserve for prefill is measured; a batch whose peak (or an OOM) takes more
    than 40% of free memory is halved first (what made the 7B hybrid fit beside its slots)."""
    eos = tiny_processor.tokenizer.eos_token_id
    _, views = _items(tiny_processor, lambda uid: 1)
    engine = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=4),
                        BatchSpec(prefill_batch=32), [eos], eos)
    gib = 2**30
    tried = []

    def measure(batch, prefix_cap):
        tried.append(batch)
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch * gib

    monkeypatch.setattr(engine, "_measure_prefill", measure)
    assert engine._prefill_peak(prefix_cap=600, free=20 * gib) == 8 * gib
    assert tried == [32, 16, 8] and engine._prefill_batch() == 8

    engine.prefill_batch_limit = None
    monkeypatch.setattr(engine, "_measure_prefill", lambda batch, prefix_cap: 100 * gib)
    assert engine._prefill_peak(prefix_cap=600, free=20 * gib) == 100 * gib  # batch 1: report, do not loop
    assert engine._prefill_batch() == 1
