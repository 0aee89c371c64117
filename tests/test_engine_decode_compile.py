"""The compiled decode forward (`SlotStore._decode_pass` under torch.compile, as the slot
engine runs it on CUDA) computes what the eager forward does, on the CPU: the attention call
is one opaque piece and every layer shares the compiled pieces around it, so a second live-row
bucket specialises nothing (the pieces after the opaque call turn dynamic once, torch's
automatic dynamic shapes) and a model of many layers compiles nothing per layer."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from dvl_batch.engine.attention import AttentionStep, SlotKV, route_attention
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.slots import SlotStore

ROWS, PREFIX, SUFFIX = 8, 12, 10


def _step(kv: SlotKV, live: torch.Tensor, row_len: torch.Tensor) -> AttentionStep:
    step = AttentionStep(kv, "rows", rows_per_group=1, write_pos=row_len, groups_limit=ROWS, live=live,
                         prefix_lengths=torch.full((ROWS,), PREFIX),
                         entries=torch.zeros(3, len(live), dtype=torch.long))  # (a VQA step's, sized per bucket)
    valid = torch.arange(SUFFIX)[None, :] <= row_len[:ROWS, None]
    step.prefix_bias = torch.zeros(ROWS, 1, 1, PREFIX)
    step.suffix_bias = torch.zeros(ROWS, SUFFIX).masked_fill(~valid, float("-inf"))[:, None, None, :]
    return step


def test_compiled_decode_forward_equals_eager_and_compiles_once_for_every_bucket_and_layer(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.text_config.num_hidden_layers = 12  # more layers than torch's recompile limit (8)
    torch.manual_seed(0)
    vlm = VisionLanguageModel(AutoModelForImageTextToText.from_config(config).eval())
    route_attention(vlm.language_model)
    kv = SlotKV.allocate(vlm.num_layers, ROWS + 1, ROWS + 1, vlm.num_kv_heads, PREFIX, SUFFIX, vlm.head_dim,
                         torch.float32, torch.device("cpu"))
    for part in (kv.prefix_k, kv.prefix_v, kv.suffix_k, kv.suffix_v):
        part.normal_()
    row_len = torch.randint(1, SUFFIX - 2, (ROWS + 1,))
    store = SlotStore.__new__(SlotStore)  # only the forward, no layout or graphs
    store.vlm = vlm
    compiled = torch.compile(store._decode_pass)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    graphs = []
    with torch.inference_mode():
        for bucket in (5, 7, 6):  # live-row buckets (sizes unlike any model dimension)
            live = torch.arange(bucket)
            tokens = torch.randint(0, 100, (bucket, 1))
            positions = (PREFIX + row_len[live])[:, None]
            saved = kv.suffix_k.clone(), kv.suffix_v.clone()
            eager = store._decode_pass(tokens, positions, _step(kv, live, row_len))
            eager_keys = kv.suffix_k.clone()
            kv.suffix_k.copy_(saved[0])
            kv.suffix_v.copy_(saved[1])
            torch._dynamo.maybe_mark_dynamic(tokens, 0)
            torch._dynamo.maybe_mark_dynamic(positions, 0)
            out = compiled(tokens, positions, _step(kv, live, row_len))
            assert torch.allclose(out, eager, atol=1e-4, rtol=1e-4)
            written = (kv.suffix_k - saved[0]).abs().amax(dim=(0, 2, 3, 4)) > 0
            assert written[:bucket].all() and not written[bucket:].any()  # the live rows' keys, nothing else
            assert (kv.suffix_k - eager_keys).abs().max() < 1e-4
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1], "a third bucket compiled again"
    assert graphs[0] <= config.text_config.num_hidden_layers, "layers did not share their compiled pieces"


def test_compiled_question_prefill_equals_eager_and_compiles_once_for_every_admission_shape(tiny_model_dir):
    """VQA's question prefill compiled as the slot engine runs it on CUDA (with the decode
    forward): the same logits and stored keys as the eager pass, with the row count and the
    question width dynamic, so admissions of other sizes and lengths compile nothing."""
    from dvl_batch.config.spec import GenerationSpec
    from dvl_batch.engine.planning import Layout
    from dvl_batch.engine.questions import QuestionPrefill

    config = AutoConfig.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    vlm = VisionLanguageModel(AutoModelForImageTextToText.from_config(config).eval())
    store = SlotStore(vlm, {}, Layout(4, 3, 20, 24), GenerationSpec(max_new_tokens=8), 1, 0, prefill_batch=2,
                      compile_steps=False, cuda_graphs=False)
    for part in (store.kv.prefix_k, store.kv.prefix_v):
        part.normal_()
    store.group_prefix[:4] = torch.tensor([20, 13, 7, 20])
    eager, compiled = QuestionPrefill(store, compiled=False), QuestionPrefill(store, compiled=True)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    graphs = []
    with torch.inference_mode():
        for slots, width in (([0, 2], 5), ([1, 2, 3], 9), ([3], 6)):
            questions = [[(7 * r + t) % 90 + 5 for t in range(width - r % 2)] for r in range(3 * len(slots))]
            store.kv.suffix_k.zero_()
            want, rows = eager(questions, slots)
            want_keys = store.kv.suffix_k.clone()
            store.kv.suffix_k.zero_()
            got, rows_again = compiled(questions, slots)
            assert torch.equal(rows, rows_again)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
            assert (store.kv.suffix_k - want_keys).abs().max() < 1e-4
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1], "a third admission shape compiled again"
