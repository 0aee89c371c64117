"""The slot store's bookkeeping on the CPU: freed groups are emptied on the device, prefill
keys land in their groups' blocks, and the bench's device clock is inert off CUDA."""

from __future__ import annotations

import pytest
import torch

from dvl_batch.bench.device_time import per_image
from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.attention import as_bits, as_words, store_prefix
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.device_clock import DeviceClock
from dvl_batch.engine.model import VisionLanguageModel

from .test_engine_parity import _items, generate_references


@pytest.mark.parametrize("questions", [1, 3])
def test_finished_rows_and_groups_read_no_keys_and_answers_stay_exact(tiny_model, tiny_processor, questions):
    """Answers end at different steps; each finished row (and each freed group) is emptied
    on the device at once, and every answer still equals generate's."""
    eos = tiny_processor.tokenizer.eos_token_id

    def force(uid, qi):
        return 2 + (uid + 2 * qi) % 5

    items, views = _items(tiny_processor, lambda uid: questions, force=force)
    refs = generate_references(tiny_model, views, items, eos, max_new=16)
    engine = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=16), BatchSpec(batch_size=12),
                        [eos], eos)
    engine.stop_schedule = True
    checked = []
    original = SlotEngine._decode

    def watch(self):
        done = original(self)
        store, q = self.store, self.layout.rows_per_group
        for row in range(self.layout.rows):
            if row not in self.rows and (row // q) in self.group_live:  # ended, its group still decoding
                assert store.row_len[row].item() == 0, f"finished row {row} still reads its suffix"
                checked.append(row)
        for slot in self.free_groups:
            assert store.group_prefix[slot].item() == 0, f"freed group {slot} still has a prefix"
        return done

    engine._decode = watch.__get__(engine)
    got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert got == refs
    if questions > 1:
        assert checked, "some rows must end while their group still decodes"


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


def test_a_stop_schedule_is_only_in_engines_built_for_it(tiny_model, tiny_processor):
    """The bench's forced-EOS schedule is opt-in: a job's decode step carries none of it, and
    scheduled prompts on such an engine are refused rather than silently run unscheduled."""
    eos = tiny_processor.tokenizer.eos_token_id
    plain, views = _items(tiny_processor, lambda uid: 1)
    engine = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=4), BatchSpec(batch_size=4),
                        [eos], eos)
    assert len(list(engine.run(iter(plain)))) == len(plain)
    assert engine.store.stop_schedule is False
    scheduled, _ = _items(tiny_processor, lambda uid: 1, force=lambda uid, qi: 2)
    fresh = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=4), BatchSpec(batch_size=4),
                       [eos], eos)
    with pytest.raises(ValueError, match="stop_schedule"):
        list(fresh.run(iter(scheduled)))


def test_only_rows_holding_a_request_are_live_at_each_decode_step(tiny_model, tiny_processor, monkeypatch):
    """A VQA group with fewer questions than Q has padding rows: they must never count as
    live (a live row's suffix is read by decode attention at every step)."""
    from dvl_batch.engine.decode_step import DecodeStep

    items, views = _items(tiny_processor, lambda uid: 1 + uid % 3)  # 1-3 questions: Q = 3, padded groups
    eos = tiny_processor.tokenizer.eos_token_id
    checked = []
    real_launch = DecodeStep.launch

    def launch(self, rows):
        checked.append((int(self.store.row_live.sum()), len(rows)))
        return real_launch(self, rows)

    monkeypatch.setattr(DecodeStep, "launch", launch)
    engine = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=6), BatchSpec(batch_size=6),
                        [eos], eos)
    assert len(list(engine.run(iter(items)))) == sum(len(i.prompts) for i in items)
    assert checked and all(live == holding for live, holding in checked), checked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_store_prefix_moves_8_byte_words_and_keeps_every_bit(dtype):
    """The word view must write exactly the bytes of the element copy, for every cache dtype,
    from contiguous tensors and from the transposed views attention hands over."""
    cache = torch.zeros(4, 2, 5, 16).to(dtype)
    assert as_words(cache).dtype == torch.int64 and as_words(cache).shape[-1] == 16 * cache.element_size() // 8
    whole = torch.randn(2, 5, 2, 16).to(dtype).transpose(1, 2)
    store_prefix(cache, torch.tensor([2, 0]), whole)
    narrow = torch.randn(1, 2, 3, 16).to(dtype)
    store_prefix(cache, torch.tensor([1]), narrow)
    bits = as_bits(cache)
    assert torch.equal(bits[2], as_bits(whole[0])) and torch.equal(bits[0], as_bits(whole[1]))
    assert torch.equal(bits[1, :, :3], as_bits(narrow[0])) and bits[1, :, 3:].sum() == 0 and bits[3].sum() == 0


def test_word_view_leaves_rows_that_are_not_whole_words_alone():
    odd = torch.zeros(2, 3, dtype=torch.bfloat16)  # 6-byte rows
    assert as_words(odd).dtype == torch.bfloat16


def test_an_idle_engine_starts_on_the_first_prefill_batch_not_on_a_full_layout(tiny_model, tiny_processor):
    """With its slots already allocated (a second run, as in the bench), the engine admits as
    soon as one prefill batch is there instead of pulling an image for every free slot first,
    and the answers do not change."""
    items, views = _items(tiny_processor, lambda uid: 1)
    eos = tiny_processor.tokenizer.eos_token_id
    engine = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=6),
                        BatchSpec(batch_size=len(items) * 2, prefill_batch=2), [eos], eos)
    first = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert len(engine.free_groups) >= len(items)  # every slot free again, the layout kept
    pulled, at_first_prefill = [], []
    original = engine._prefill

    def prefill(groups, slots):
        if not at_first_prefill:
            at_first_prefill.append(len(pulled))
        return original(groups, slots)

    engine._prefill = prefill

    def source():
        for item in items:
            pulled.append(item.uid)
            yield item

    again = {(c.uid, c.index): c.tokens for c in engine.run(source())}
    assert at_first_prefill == [2]
    assert again == first


def test_word_view_is_refused_for_misaligned_views_and_never_mixed_with_elements():
    base = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    assert as_words(base.view(-1)[4:].view(2, 2, 11)[..., :8]).dtype == torch.bfloat16  # row stride 22 bytes
    assert as_words(base.view(-1)[1:17].view(2, 8)).dtype == torch.bfloat16  # starts 2 bytes into a word
    cache = torch.zeros(3, 1, 4, 8, dtype=torch.bfloat16)
    kv = torch.randn(1, 4, 1, 8).to(torch.bfloat16).permute(0, 2, 1, 3)  # size-1 head dim, odd stride
    store_prefix(cache, torch.tensor([2]), kv)  # cache in words, kv as it came: copied element-wise
    assert torch.equal(cache[2], kv[0]) and cache[:2].abs().sum() == 0
    odd = torch.randn(1, 1, 4, 8).to(torch.bfloat16)[..., :6]  # 12-byte rows never take the word view
    store_prefix(torch.zeros(2, 1, 4, 6, dtype=torch.bfloat16), torch.tensor([0]), odd)


def test_group_entries_cover_every_batch_row_once_with_at_most_a_group_per_entry():
    """The VQA decode step's batch: sorted live row ids (groups of 3 rows), padded with the spare
    row (index 9 of a 3-group layout, group 3); each entry is one group's consecutive live rows."""
    import numpy as np

    from dvl_batch.engine.decode_step import entry_capacity, group_entries

    rows = np.array([0, 2, 4, 5, 6, 9, 9, 9, 9, 9])  # group 0: 2 rows, 1: 2 rows, 2: 1 row, then 5 padding rows
    capacity = entry_capacity(len(rows), groups=3, rows_per_group=3)
    groups, starts, counts = group_entries(rows, 3, capacity, spare_group=3)
    used = counts > 0
    assert list(groups[used]) == [0, 1, 2, 3, 3] and list(starts[used]) == [0, 2, 4, 5, 8]
    assert list(counts[used]) == [2, 2, 1, 3, 2]  # the padding run is cut into entries of at most 3 rows
    assert (groups[~used] == 3).all()  # unused entries name the spare group and hold no rows
    covered = sorted(r for s, n in zip(starts[used], counts[used], strict=True) for r in range(s, s + n))
    assert covered == list(range(len(rows)))
    assert capacity == min(10, 3 + 4)


def test_a_question_too_long_for_the_model_is_its_own_error_row_only(tiny_model, tiny_processor):
    """One over-long question of an image gets the error; its sibling questions are answered
    (the whole group was rejected, turning short questions into errors with the wrong reason)."""
    from dvl_batch.engine.types import EnginePrompt

    from .test_engine_parity import _tokenize

    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1)
    short = _tokenize(tiny_processor, "What is this?")
    long = _tokenize(tiny_processor, "What is this? " + "Tell me more. " * 60)
    item = items[0]
    item.prompts[:] = [EnginePrompt(0, *short), EnginePrompt(1, *long), EnginePrompt(2, *short)]
    engine = SlotEngine(VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=4), BatchSpec(batch_size=6),
                        [eos], eos)
    engine.vlm.max_positions = len(short[0]) + 4 + 10  # room for the short prompts only
    got = {c.index: c for c in engine.run(iter([item]))}
    assert got[1].finish_reason == "error" and "exceeds the model's" in got[1].error
    assert got[0].finish_reason != "error" and got[2].finish_reason != "error" and got[0].tokens == got[2].tokens
