"""`--kv-dtype fp8`: the slot engine keeps keys and values in one byte each.

The decode kernels widen fp8 as they load it (checked against the torch path in
tests/test_engine_triton_decode.py, also for fp8 caches); here, on CPU, the torch path
reads the same fp8 cache, so the whole engine runs with it: every request answered,
the cache really is fp8, and the answers stay close to the float32 cache's.
The CLI refuses fp8 on CPU (tests/test_config_errors.py): there it would only be slower.
"""

from __future__ import annotations

import torch

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.attention import to_cache
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.model import VisionLanguageModel, kv_cache_dtype

from .test_engine_parity import MAX_NEW, _items

FP8 = torch.float8_e4m3fn


def test_values_beyond_the_fp8_range_saturate_instead_of_becoming_nan():
    stored = to_cache(torch.tensor([1000.0, -1e6, 1.0, 0.3]), FP8).float()
    assert stored[:3].tolist() == [448.0, -448.0, 1.0]
    assert abs(stored[3].item() - 0.3) < 0.02  # 3 mantissa bits
    assert kv_cache_dtype("fp8") == FP8 and kv_cache_dtype("auto") is None


def _answers(model, items, views, eos, kv_dtype):
    engine = SlotEngine(
        VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=MAX_NEW), BatchSpec(batch_size=6), [eos], eos,
        kv_dtype=kv_dtype,
    )
    got = {(c.uid, c.index): c for c in engine.run(iter(items))}
    return got, engine


def test_an_fp8_cache_is_exactly_a_cache_of_fp8_rounded_values(tiny_model, tiny_processor, monkeypatch):
    """The engine with an fp8 cache gives the tokens of a float32 cache whose every stored
    key and value was rounded through fp8: nothing but the storage changes (no scale, no
    lost positions, no stale slots). (Agreement with unrounded answers is measured by
    `dvl-batch bench --kv-dtype fp8` on the real shape; the tiny random model is all near-ties.)"""
    from dvl_batch.engine import attention, slots

    items, views = _items(tiny_processor, lambda uid: 1 + uid % 3)  # captions and 2-3 questions per image
    eos = tiny_processor.tokenizer.eos_token_id
    fp8, engine = _answers(tiny_model, items, views, eos, FP8)
    assert engine.store.kv.prefix_k.dtype == FP8 and engine.store.kv.suffix_v.dtype == FP8
    assert all(c.finish_reason in ("stop", "length") and c.tokens for c in fp8.values())

    def rounded(values, cache_dtype):
        return to_cache(values, FP8).to(cache_dtype)

    monkeypatch.setattr(attention, "to_cache", rounded)
    monkeypatch.setattr(slots, "to_cache", rounded)
    reference, engine = _answers(tiny_model, items, views, eos, None)
    assert engine.store.kv.prefix_k.dtype == torch.float32
    assert {k: c.tokens for k, c in fp8.items()} == {k: c.tokens for k, c in reference.items()}
