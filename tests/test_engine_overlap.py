"""The overlapped prefill's scheduling, on the CPU: admissions whose prefill has not finished
hold their rows out of decode, the engine waits for one only when nothing else can run, and
the answers are generate's exactly (the device side is covered by tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.overlap import PrefillStream

from .test_engine_parity import MAX_NEW, generate_references


class SlowEvent:
    """Reports "not yet" to the first `polls` queries, like a prefill still running."""

    def __init__(self, polls: int, log: list):
        self.polls, self.log = polls, log

    def query(self) -> bool:
        self.polls -= 1
        self.log.append("poll")
        return self.polls < 0


class SlowPrefills(PrefillStream):
    """A prefill stream whose admissions finish only after a few polls."""

    def __init__(self, polls: int):
        super().__init__(torch.device("cpu"), enabled=False)
        self.polls, self.log = polls, []

    @property
    def overlapping(self) -> bool:
        return True

    def _finished_event(self, logits):
        return SlowEvent(self.polls, self.log)

    def _decode_waits_for(self, done) -> None:
        self.log.append("waited" if done.polls >= 0 else "ready")


@pytest.mark.parametrize("questions", [1, 3])
def test_rows_start_only_when_their_prefill_has_finished(tiny_model, tiny_processor, questions):
    from .test_engine_parity import _items

    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: questions)
    refs = generate_references(tiny_model, views, items, eos)
    engine = SlotEngine(
        VisionLanguageModel(tiny_model), views, GenerationSpec(max_new_tokens=MAX_NEW),
        BatchSpec(batch_size=2 * questions, prefill_batch=1), [eos], eos,
    )
    engine.prefills = prefills = SlowPrefills(polls=2)
    got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
    assert got == refs
    assert not prefills.waiting
    assert "ready" in prefills.log, "no admission was started after polling while others decoded"
    assert "waited" in prefills.log, "the first admission (nothing decoding) was not waited for"
    assert engine.stats.prefill_calls >= len(items)


def test_prefill_stream_is_a_plain_queue_without_cuda():
    stream = PrefillStream(torch.device("cpu"), enabled=True)
    assert not stream.overlapping
    with stream.enqueue():
        logits = torch.zeros(2, 5)
    stream.hold([], [3, 4], logits)
    admission = stream.ready(wait=False)
    assert admission.slots == [3, 4] and admission.done is None and stream.ready(wait=False) is None
