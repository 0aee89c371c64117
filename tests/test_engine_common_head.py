"""The prompt head every row shares (the system prompt) is computed once per layout, and its
keys/values are stored in front of each group's own prefix as the prefill writes it.

Answers must not change: the slot engine with the head equals generate and the engine
without it (float32 on the CPU); prompts of another template shrink the head once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.attention import _after_common
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.planning import MIN_COMMON_TOKENS, common_head, starts_with
from dvl_batch.engine.types import EnginePrompt, WorkItem
from dvl_batch.preprocess.prompts import PromptRenderer

from .test_engine_parity import _items, generate_references

IMAGE = 99


def test_common_head_ends_before_the_first_image_token_and_keeps_a_token_per_prompt():
    system = list(range(1, 13))
    a = system + [IMAGE, IMAGE, 50]
    b = system + [IMAGE, IMAGE, 51]
    assert common_head([a, b], IMAGE) == tuple(system)
    assert common_head([a, a], IMAGE) == tuple(system)  # identical prompts still stop at the image
    assert common_head([system + [7]], None) == tuple(system)  # text-only: one token of its own
    assert common_head([system], None) == tuple(system[:-1])
    assert common_head([a, [1, 2, 3] + a], IMAGE) == ()  # nothing shared
    assert common_head([a[:MIN_COMMON_TOKENS - 1] + [IMAGE]], IMAGE) == ()  # too short to be worth it
    assert common_head([], IMAGE) == ()


def test_common_head_only_shrinks_from_the_previous_layout():
    system = list(range(1, 13))
    longer = system + [40, 41, IMAGE]
    assert common_head([longer], IMAGE, previous=tuple(system)) == tuple(system)
    assert common_head([longer], IMAGE, previous=()) == ()
    assert common_head([system[:10] + [77, IMAGE]], IMAGE, previous=tuple(system)) == tuple(system[:10])
    assert starts_with(longer, tuple(system)) and not starts_with(system, tuple(system))
    assert not starts_with([0] + longer, tuple(system))


def test_prefill_after_the_head_equals_causal_attention_over_the_whole_prompt():
    torch.manual_seed(0)
    batch, heads, kv_heads, head_len, own, dim = 2, 4, 2, 5, 7, 8
    keys = torch.randn(batch, kv_heads, head_len + own, dim)
    values = torch.randn(batch, kv_heads, head_len + own, dim)
    keys[1, :, :head_len], values[1, :, :head_len] = keys[0, :, :head_len], values[0, :, :head_len]  # one shared head
    queries = torch.randn(batch, heads, head_len + own, dim)
    whole = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=True)
    got = _after_common(queries[:, :, head_len:], keys, values, own, dim**-0.5)
    torch.testing.assert_close(got, whole[:, :, head_len:].transpose(1, 2))


def _engine(model, views, eos, common: bool, batch_size=None, prefill_batch=None) -> SlotEngine:
    return SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=12),
                      BatchSpec(batch_size=batch_size, prefill_batch=prefill_batch), [eos], eos, common_head=common)


def test_slot_engine_with_the_shared_head_equals_generate_and_the_engine_without_it(tiny_model, tiny_processor):
    eos = tiny_processor.tokenizer.eos_token_id
    for questions in (1, 3):  # captions (whole prompt as prefix) and VQA groups (questions as suffixes)
        items, views = _items(tiny_processor, lambda uid, q=questions: 1 + uid % q)
        refs = generate_references(tiny_model, views, items, eos, max_new=12)
        shared = _engine(tiny_model, views, eos, common=True)
        got = {(c.uid, c.index): c.tokens for c in shared.run(iter(items))}
        head = shared.layout.common
        assert len(head) >= MIN_COMMON_TOKENS and shared.stats.common_tokens == len(head)
        assert all(p.input_ids[: len(head)] == list(head) for item in items for p in item.prompts)
        plain = _engine(tiny_model, views, eos, common=False)
        alone = {(c.uid, c.index): c.tokens for c in plain.run(iter(items))}
        assert plain.layout.common == ()
        assert got == refs == alone, questions


def test_prompts_of_another_system_prompt_shrink_the_head_once(tiny_model, tiny_processor):
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1)
    other = PromptRenderer(tiny_processor, "Answer as a careful museum guide would.")
    late = []
    for item in items:
        tokenized = other.tokenize("Describe this image.", 1)
        late.append(WorkItem(item.uid + 100, item.pixels, [EnginePrompt(0, tokenized.input_ids, tokenized.prefix_len)]))
    refs = generate_references(tiny_model, views, items + late, eos, max_new=12)
    engine = _engine(tiny_model, views, eos, common=True, batch_size=2, prefill_batch=1)  # laid out after 2 items
    heads = []

    def feed():
        yield from items
        heads.append(engine.layout.common)  # the first layout's: the default system prompt
        yield from late

    got = {(c.uid, c.index): c.tokens for c in engine.run(feed())}
    assert got == refs and len(got) == 2 * len(items)
    final = engine.layout.common
    assert len(heads[0]) >= MIN_COMMON_TOKENS and len(final) < len(heads[0])
    assert all(tuple(p.input_ids[: len(final)]) == final for item in items + late for p in item.prompts)
