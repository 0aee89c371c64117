"""GPU checks of the slot engine (skipped without CUDA; run on the GPU machine).

- float32: the slot engine with a CUDA-graph decode equals `generate` token for token;
- the CUDA graph replays exactly what the eager step computes;
- bfloat16: answers match `generate` for the large majority (kernels differ between the
  two paths, so near-ties in the logits can flip; the rate is printed).
"""

from __future__ import annotations

import pytest
import torch

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.model import VisionLanguageModel

from .test_engine_parity import MAX_NEW, _items

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(model, views, items, eos, graphs: bool, compile_steps: bool = True, batch_size=8, overlap=True, prefill_batch=None,
         epilogue: bool = False):
    """The engine's answers; the vision epilogue is off unless asked for: it is not transformers'
    arithmetic (test_cuda_vision_epilogue_features_stay_close_to_transformers checks it)."""
    engine = SlotEngine(
        VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=MAX_NEW),
        BatchSpec(batch_size=batch_size, cuda_graphs=graphs, compile=compile_steps, overlap_prefill=overlap,
                  prefill_batch=prefill_batch, vision_epilogue=epilogue), [eos], eos,
    )
    return {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}


def _differences(got, refs):
    return {k: (refs[k], got.get(k)) for k in refs if got.get(k) != refs[k]}


@pytest.mark.parametrize("questions", [1, 3])
@pytest.mark.parametrize("graphs,compile_steps", [(False, False), (True, False), (True, True)])
def test_cuda_float32_matches_generate(tiny_model_dir, tiny_processor, questions, graphs, compile_steps):
    """Eager kernels give generate's tokens exactly; compiled (fused, reordered) float32
    arithmetic may flip a rare near-tie of this random model, so it gets a 90% bar."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: questions)
    refs = _reference_on(model, views, items, eos)
    got = _run(model, views, items, eos, graphs=graphs, compile_steps=compile_steps)
    differences = _differences(got, refs)
    if compile_steps:
        assert len(differences) <= 0.1 * len(refs), differences
    else:
        assert not differences, differences


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("questions", [1, 3])
def test_cuda_float32_small_admissions_match_generate(tiny_model_dir, tiny_processor, questions, overlap):
    """Admissions of one image into a few slots, so most prefills run while other rows decode
    (on the prefill stream with `overlap`): eager float32 gives generate's tokens exactly."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: questions)
    refs = _reference_on(model, views, items, eos)
    got = _run(model, views, items, eos, graphs=True, compile_steps=False, batch_size=2 * questions, overlap=overlap,
               prefill_batch=1)
    assert not _differences(got, refs)


def test_triton_decode_matches_torch_path_on_cuda():
    from dvl_batch.engine.attention import AttentionStep, SlotKV, _rows_attention
    from dvl_batch.engine.triton_decode import decode_attention

    torch.manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for q_rows, groups, splits in ((1, 300, 1), (5, 40, 2), (1, 4, 8)):
            heads, dim, prefix_cap, suffix_cap, rows = 16, 128, 616, 136, groups * q_rows
            kv = SlotKV.allocate(1, groups, rows, heads, prefix_cap, suffix_cap, dim, dtype, "cuda")
            for t in (kv.prefix_k, kv.prefix_v, kv.suffix_k, kv.suffix_v):
                t.normal_()
            prefix_len = torch.full((groups,), prefix_cap, device="cuda")
            prefix_len[::3] = 300
            row_len = torch.randint(0, suffix_cap, (rows,), device="cuda")
            query = torch.randn(rows, heads, 1, dim, device="cuda", dtype=dtype)
            p_range, s_range = torch.arange(prefix_cap, device="cuda"), torch.arange(suffix_cap, device="cuda")
            prefix_bias = torch.zeros(groups, prefix_cap, device="cuda").masked_fill(p_range[None] >= prefix_len[:, None], float("-inf"))
            suffix_bias = torch.zeros(rows, suffix_cap, device="cuda").masked_fill(s_range[None] > row_len[:, None], float("-inf"))
            step = AttentionStep(kv, "rows", rows_per_group=q_rows, write_pos=row_len, prefix_bias=prefix_bias[:, None, None],
                                 suffix_bias=suffix_bias[:, None, None])
            expected = _rows_attention(step, 0, query.float() if dtype == torch.float32 else query, dim**-0.5)[:, :, 0]
            got = decode_attention(query[:, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                                   prefix_len, row_len, q_rows, dim**-0.5, splits)
            error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
            assert error < tolerance, (dtype, q_rows, splits, error)
            if q_rows == 1:  # the decode step's compacted batch: entry b reads slot live[b]
                live = torch.randperm(rows, device="cuda")[: max(1, rows // 2)]
                got = decode_attention(query[live, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                                       prefix_len, row_len, 1, dim**-0.5, splits * 2, live=live)
                error = ((got.float() - expected[live].float()).norm() / expected[live].float().norm()).item()
                assert error < tolerance, ("indexed", dtype, splits, error)
            else:  # VQA compacted: some rows of some groups live, then padding rows
                from dvl_batch.engine.decode_step import entry_capacity, group_entries

                live = torch.randperm(rows, device="cuda")[: rows // 2].sort().values
                live = torch.cat([live, live[-1:].expand(7)])
                capacity = entry_capacity(len(live), groups, q_rows)
                entries = torch.from_numpy(group_entries(live.cpu().numpy(), q_rows, capacity, groups - 1)).cuda()
                got = decode_attention(query[live, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                                       prefix_len, row_len, q_rows, dim**-0.5, splits, live=live, entries=entries)
                error = ((got.float() - expected[live].float()).norm() / expected[live].float().norm()).item()
                assert error < tolerance, ("grouped", dtype, splits, error)


@pytest.mark.parametrize("q_rows", [5, 1])
def test_triton_kernels_read_an_fp8_cache_on_cuda(q_rows):
    """--kv-dtype fp8: the kernels widen fp8 keys/values as they load them; the torch path
    upcasts the same cache, so both compute the same attention (one-row groups, captions,
    take the CUDA-core prefix loop of `FP8_ONE_ROW_CONFIG`)."""
    from dvl_batch.engine.attention import AttentionStep, SlotKV, _rows_attention
    from dvl_batch.engine.triton_decode import decode_attention
    from dvl_batch.engine.triton_suffix import suffix_prefill_attention

    torch.manual_seed(0)
    heads, dim, prefix_cap, suffix_cap, groups = 16, 128, 616, 136, 24
    rows = groups * q_rows
    kv = SlotKV.allocate(1, groups, rows, heads, prefix_cap, suffix_cap, dim, torch.float8_e4m3fn, "cuda")
    for t in (kv.prefix_k, kv.prefix_v, kv.suffix_k, kv.suffix_v):
        t.copy_(torch.randn(t.shape, device="cuda").to(t.dtype))
    prefix_len = torch.full((groups,), prefix_cap, device="cuda")
    row_len = torch.randint(0, suffix_cap, (rows,), device="cuda")
    p_range, s_range = torch.arange(prefix_cap, device="cuda"), torch.arange(suffix_cap, device="cuda")
    prefix_bias = torch.zeros(groups, prefix_cap, device="cuda").masked_fill(p_range[None] >= prefix_len[:, None], float("-inf"))
    suffix_bias = torch.zeros(rows, suffix_cap, device="cuda").masked_fill(s_range[None] > row_len[:, None], float("-inf"))
    query = torch.randn(rows, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    step = AttentionStep(kv, "rows", rows_per_group=q_rows, write_pos=row_len, prefix_bias=prefix_bias[:, None, None],
                         suffix_bias=suffix_bias[:, None, None])
    expected = _rows_attention(step, 0, query, dim**-0.5)[:, :, 0].float()
    got = decode_attention(query[:, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                           prefix_len, row_len, q_rows, dim**-0.5, 2).float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
    groups_t = torch.arange(0, groups, 2, device="cuda")
    rows_t = (groups_t[:, None] * q_rows + torch.arange(q_rows, device="cuda")[None]).reshape(-1)
    new = 17
    query = torch.randn(len(rows_t), new, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    causal = s_range[None, :] <= torch.arange(new, device="cuda")[:, None]
    step = AttentionStep(kv, "rows", groups=groups_t, rows=rows_t, rows_per_group=q_rows,
                         prefix_bias=prefix_bias[groups_t][:, None, None],
                         suffix_bias=torch.zeros(new, suffix_cap, device="cuda").masked_fill(~causal, float("-inf"))[
                             None, None].expand(len(rows_t), 1, -1, -1))
    expected = _rows_attention(step, 0, query.contiguous(), dim**-0.5).float()
    got = suffix_prefill_attention(query, kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                                   prefix_len, groups_t, rows_t, q_rows, dim**-0.5).float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


def test_triton_suffix_prefill_matches_torch_path_on_cuda():
    from dvl_batch.engine.attention import AttentionStep, SlotKV, _rows_attention
    from dvl_batch.engine.triton_suffix import suffix_prefill_attention

    torch.manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for q_rows, new in ((5, 23), (1, 9), (5, 1)):
            heads, dim, prefix_cap, suffix_cap, all_groups = 16, 128, 630, 160, 40
            kv = SlotKV.allocate(1, all_groups, all_groups * q_rows, heads, prefix_cap, suffix_cap, dim, dtype, "cuda")
            for t in (kv.prefix_k, kv.prefix_v, kv.suffix_k, kv.suffix_v):
                t.normal_()
            prefix_all = torch.full((all_groups,), prefix_cap, device="cuda")
            prefix_all[::3] = 300
            groups = torch.arange(all_groups - 1, 0, -2, device="cuda")
            rows = (groups[:, None] * q_rows + torch.arange(q_rows, device="cuda")[None]).reshape(-1)
            query = torch.randn(len(rows), new, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
            p_range, s_range = torch.arange(prefix_cap, device="cuda"), torch.arange(suffix_cap, device="cuda")
            prefix_bias = torch.zeros(len(groups), prefix_cap, device="cuda").masked_fill(
                p_range[None] >= prefix_all[groups][:, None], float("-inf"))
            causal = s_range[None, :] <= torch.arange(new, device="cuda")[:, None]
            suffix_bias = torch.zeros(new, suffix_cap, device="cuda").masked_fill(~causal, float("-inf"))
            step = AttentionStep(kv, "rows", groups=groups, rows=rows, rows_per_group=q_rows,
                                 prefix_bias=prefix_bias[:, None, None],
                                 suffix_bias=suffix_bias[None, None].expand(len(rows), 1, -1, -1))
            expected = _rows_attention(step, 0, query.contiguous(), dim**-0.5)
            got = suffix_prefill_attention(query, kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                                           prefix_all, groups, rows, q_rows, dim**-0.5)
            error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
            assert error < tolerance, (dtype, q_rows, new, error)


def test_cuda_graph_replays_the_eager_step_in_bfloat16(tiny_model_dir, tiny_processor):
    """bf16 agreement with generate is measured on the real 1.3B shape by `dvl-batch bench`
    (the tiny random model in bf16 is all near-ties); here: graph replay == eager step."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1 + uid % 3)
    graph = _run(model, views, items, eos, graphs=True, compile_steps=False)
    eager = _run(model, views, items, eos, graphs=False, compile_steps=False)
    assert graph == eager


def _reference_on(model, views, items, eos):
    """generate() one request at a time, inputs moved to the model's device and dtype."""
    moved = []
    for item in items:
        pixels = {k: v.cuda() for k, v in item.pixels.items()}
        moved.append(type(item)(item.uid, pixels, item.prompts))
    return _reference_cuda(model, views, moved, eos)


def _reference_cuda(model, views, items, eos):
    from dvl_batch.engine.generate import trim_at_eos
    from dvl_batch.preprocess.images import normalize_pixels

    by_name = {v.name: v for v in views}
    refs = {}
    for item in items:
        pixels = {k: normalize_pixels(v, by_name[k], model.dtype) for k, v in item.pixels.items()}
        for prompt in item.prompts:
            ids = torch.tensor([prompt.input_ids], device="cuda")
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels,
                                 max_new_tokens=MAX_NEW, do_sample=False)
            refs[(item.uid, prompt.index)] = trim_at_eos(out[0, ids.shape[1]:].tolist(), [eos])[0]
    return refs


def test_fp8_row_quantizer_gives_the_torch_bits_on_cuda():
    """The Triton row quantizer of `--quantize fp8` equals the torch expression bit for bit
    (Triton's interpreter cannot check this: its e4m3 cast rounds differently)."""
    from dvl_batch.engine.fp8_linear import quantize_rows_torch
    from dvl_batch.engine.triton_quantize import quantize_rows_fp8

    torch.manual_seed(0)
    for rows, cols in [(1, 2048), (37, 5632), (1024, 2048), (3, 48)]:
        x = (torch.randn(rows, cols, device="cuda") * 4).to(torch.bfloat16)
        x[0] = 0  # a zero row: scale floor, values all zero
        values, scale = quantize_rows_fp8(x)
        ref_values, ref_scale = quantize_rows_torch(x)
        assert torch.equal(scale, ref_scale)
        assert torch.equal(values.view(torch.uint8), ref_values.view(torch.uint8)), (rows, cols)


def test_fp8_linear_on_cuda_matches_its_dequantized_product():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmul needs compute capability >= 8.9")
    from dvl_batch.engine.fp8_linear import Fp8Linear, quantize_rows

    torch.manual_seed(0)
    linear = torch.nn.Linear(2048, 5632, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, min_rows=0)
    x = torch.randn(3, 77, 2048, device="cuda", dtype=torch.bfloat16)
    got = layer(x).float()
    values, scale = quantize_rows(x.reshape(-1, 2048))
    exact = layer.dequantized_product(values, scale).reshape(got.shape)
    assert ((got - exact).norm() / exact.norm()).item() < 1e-2  # bf16 output rounding, fp32 accumulation
    bf16 = linear(x).float()
    assert ((got - bf16).norm() / bf16.norm()).item() < 0.06  # e4m3 weights and activations: ~4% per element
    compiled = torch.compile(layer)(x).float()  # the prefix pass's path: torch quantisation fused by inductor
    assert ((compiled - exact).norm() / exact.norm()).item() < 1e-2


def test_fused_fp8_projections_on_cuda_match_the_separate_ones():
    """A fused float8 Q/K/V product (`engine/fused_layers.py`) gives what the three separate
    `_scaled_mm` products give: one scale per output row, so concatenating is exact up to
    the kernels' accumulation order."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmul needs compute capability >= 8.9")
    from dvl_batch.engine.fp8_linear import Fp8Linear
    from dvl_batch.engine.fused_layers import _concatenated

    torch.manual_seed(0)
    linears = [torch.nn.Linear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    layers = [Fp8Linear.from_linear(linear, min_rows=16) for linear in linears]
    fused = _concatenated(layers)
    for rows in (8, 4096):  # below min_rows: the bf16 products; above: float8
        x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
        separate = torch.cat([layer(x) for layer in layers], dim=-1).float()
        got = fused(x).float()
        assert ((got - separate).norm() / separate.norm()).item() < 1e-3


def test_cuda_gelu_epilogue_is_siglips_tanh_gelu():
    """The engine's SigLIP MLP relies on CUDA's `_addmm_activation` applying the tanh GELU
    (SigLIP's gelu_pytorch_tanh), not the exact one, in float32 and bfloat16."""
    import torch.nn.functional as F

    from dvl_batch.engine.vision_layers import gelu_mlp

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 256, device="cuda", generator=gen) * 2
    w = torch.randn(1024, 256, device="cuda", generator=gen) * 0.1
    b = torch.randn(1024, device="cuda", generator=gen)
    linear = F.linear(x, w, b)
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    tanh_err = (got - F.gelu(linear, approximate="tanh")).abs().max().item()
    erf_err = (got - F.gelu(linear)).abs().max().item()
    assert tanh_err < 1e-4 < erf_err, (tanh_err, erf_err)
    mlp = torch.nn.Module()
    mlp.fc1, mlp.fc2 = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)
    mlp = mlp.to("cuda", torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        ref = mlp.fc2(F.gelu(mlp.fc1(xb).float(), approximate="tanh").to(torch.bfloat16))
        out = gelu_mlp(mlp, xb)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_cuda_vision_epilogue_features_stay_close_to_transformers(tiny_model_dir):
    """The slot engine's image encoding as it runs on CUDA (compiled, bf16, the epilogue) against
    transformers' forward of the same model."""
    from transformers import AutoModelForImageTextToText

    from dvl_batch.engine.vision_layers import engine_image_features, use_vision_epilogue

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).to("cuda").eval()
    vlm = VisionLanguageModel(model)
    encode = torch.compile(engine_image_features(vlm, True), dynamic=False)
    assert use_vision_epilogue(model) == len(model.model.vision_model.encoder.layers)
    pixels = {"pixel_values": torch.randn(4, 3, 384, 384, device="cuda", dtype=torch.bfloat16)}
    with torch.inference_mode():
        want, got = vlm.image_features(pixels).float(), encode(pixels).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2
