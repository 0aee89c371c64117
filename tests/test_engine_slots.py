"""The slot store's bookkeeping on the CPU: freed groups are emptied on the device, prefill
keys land in their groups' blocks, and the bench's device clock is inert off CUDA."""

from __future__ import annotations

import torch

from dvl_batch.bench.device_time import per_image
from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.device_clock import DeviceClock
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.slots import store_prefix

from .test_engine_parity import _items


def test_finished_groups_are_emptied_so_decode_reads_none_of_their_keys(tiny_model, tiny_processor):
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1, force=lambda uid, qi: 2 + uid)  # answers of 2, 3, ... tokens
    engine = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=16), BatchSpec(batch_size=8),
                        [eos], eos)
    released = []
    original = SlotEngine._decode

    def watch(self):
        done = original(self)
        if done:
            released.append({c.uid for c in done})
            store, live = self.store, set(self.group_live)
            for slot in range(self.layout.groups):
                if slot not in live and slot in self.free_groups:
                    assert store.group_prefix[slot].item() == 0, f"freed group {slot} still has a prefix"
                    assert store.row_len[slot].item() == 0, f"freed row {slot} still reads its old suffix"
        return done

    engine._decode = watch.__get__(engine)
    completions = list(engine.run(iter(items)))
    assert len(completions) == len(items)
    assert len(released) > 1, "answers of different lengths must end at different steps"
    assert all(c.tokens[-1] == eos for c in completions)


def test_store_prefix_writes_whole_blocks_and_narrow_prefixes():
    cache = torch.zeros(5, 2, 6, 3)
    kv = torch.randn(2, 6, 2, 3).transpose(1, 2)  # [B, H, T, D] view, as attention hands it over
    store_prefix(cache, torch.tensor([3, 1]), kv)
    assert torch.equal(cache[3], kv[0]) and torch.equal(cache[1], kv[1])
    assert cache[[0, 2, 4]].abs().sum() == 0
    narrow = torch.randn(1, 2, 4, 3)
    store_prefix(cache, torch.tensor([0]), narrow)
    assert torch.equal(cache[0, :, :4], narrow[0]) and cache[0, :, 4:].abs().sum() == 0


def test_device_clock_is_inert_on_cpu_and_per_image_adds_up():
    clock = DeviceClock(torch.device("cpu"))
    with clock.phase("decode"):
        pass
    assert clock.seconds() == {} and clock.counts["decode"] == 1
    ms = per_image({"vision": 1.0, "prefix": 3.0, "decode": 4.0}, {"attention_fraction": 0.75}, wall=10.0, images=1000)
    assert ms["busy"] == 8.0 and ms["idle"] == 2.0
    assert ms["decode_attention"] == 3.0 and ms["decode_rest"] == 1.0
