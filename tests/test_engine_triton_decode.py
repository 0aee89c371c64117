"""The Triton decode attention equals the torch path of the slot cache.

Runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess,
since the variable must be set before triton is imported); skipped when triton is
not installed. On a GPU the same comparison runs in tests/test_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch
    from dvl_batch.engine.attention import AttentionStep, SlotKV, _kernel_writes, _rows_attention, _rows_step
    from dvl_batch.engine.decode_step import entry_capacity, group_entries
    from dvl_batch.engine.triton_decode import KernelConfig, choose_splits, decode_attention

    def fill(kv):
        for t in (kv.prefix_k, kv.prefix_v, kv.suffix_k, kv.suffix_v):
            t.copy_(torch.randn(t.shape).to(t.dtype))

    FP8 = torch.float8_e4m3fn  # --kv-dtype fp8: the kernels widen what they load; the torch path upcasts
    torch.manual_seed(0)
    for q_rows, heads, kv_heads, groups, splits, cache in [
        (1, 2, 2, 3, 1, torch.float32), (3, 4, 2, 2, 2, torch.float32), (5, 2, 1, 2, 4, torch.float32),
        (3, 4, 2, 3, 2, FP8), (1, 4, 2, 3, 2, FP8),
    ]:
        dim, prefix_cap, suffix_cap, layers = 16, 70, 20, 1
        rows = groups * q_rows
        kv = SlotKV.allocate(layers, groups, rows, kv_heads, prefix_cap, suffix_cap, dim, cache, "cpu")
        fill(kv)
        prefix_len = torch.randint(1, prefix_cap + 1, (groups,))
        prefix_len[0] = prefix_cap
        row_len = torch.randint(0, suffix_cap, (rows,))
        if groups > 2:  # a released group: no prefix, rows back at their first suffix position
            prefix_len[-1] = 0
            row_len[-q_rows:] = 0
        query = torch.randn(rows, heads, 1, dim)
        prefix_range, suffix_range = torch.arange(prefix_cap), torch.arange(suffix_cap)
        prefix_bias = torch.zeros(groups, prefix_cap).masked_fill(prefix_range[None] >= prefix_len[:, None], float("-inf"))
        suffix_bias = torch.zeros(rows, suffix_cap).masked_fill(suffix_range[None] > row_len[:, None], float("-inf"))
        step = AttentionStep(kv, "rows", rows_per_group=q_rows, write_pos=row_len,
                             prefix_bias=prefix_bias[:, None, None], suffix_bias=suffix_bias[:, None, None])
        expected = _rows_attention(step, 0, query, dim ** -0.5)[:, :, 0]
        for config in (None, KernelConfig(fma_prefix=True)):  # the CUDA-core prefix applies to one-row groups
            got = decode_attention(query[:, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                                   prefix_len, row_len, q_rows, dim ** -0.5, splits, config)
            error = ((got - expected).norm() / expected.norm()).item()
            assert error < 1e-5, (q_rows, heads, kv_heads, splits, config, error)
            if q_rows == 1:  # a compacted batch: entry b is slot live[b] (a slot twice: padding entries)
                live = torch.tensor([rows - 1, 0, rows - 1][: rows])
                got = decode_attention(query[live, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0],
                                       kv.suffix_v[0], prefix_len, row_len, 1, dim ** -0.5, splits, config, live=live)
                error = ((got - expected[live]).norm() / expected[live].norm()).item()
                assert error < 1e-5, ("indexed", heads, kv_heads, splits, config, error)
            elif config is None:  # VQA compacted: some rows of some groups live, padded with the last row
                live_rows = sorted({0, q_rows - 1, q_rows + 1, rows - 1})
                pad = [rows - 1] * (q_rows + 2)  # a padding run longer than a group (the spare row's role)
                live = torch.tensor(live_rows + pad)
                capacity = entry_capacity(len(live), groups, q_rows)
                entries = torch.from_numpy(group_entries(live.numpy(), q_rows, capacity, groups - 1))
                got = decode_attention(query[live, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0],
                                       kv.suffix_v[0], prefix_len, row_len, q_rows, dim ** -0.5, splits,
                                       live=live, entries=entries)
                error = ((got - expected[live]).norm() / expected[live].norm()).item()
                assert error < 1e-5, ("grouped", q_rows, heads, kv_heads, splits, error)
    assert choose_splits(436, 16, 132) == 1 and choose_splits(8, 16, 132) >= 4

    # the decode step's route: a compacted batch padded with the spare row past the layout (its
    # group is the scratch group, also past the layout), caches sized groups+1 / rows+1 as the
    # store allocates them; the Triton route equals the torch route (scatter, attend, gather)
    for q_rows, cache in [(1, torch.float32), (3, torch.float32), (1, FP8), (3, FP8)]:
        heads, kv_heads, groups, dim, prefix_cap, suffix_cap = 4, 2, 3, 16, 70, 20
        rows = groups * q_rows
        kv = SlotKV.allocate(1, groups + 1, rows + 1, kv_heads, prefix_cap, suffix_cap, dim, cache, "cpu")
        fill(kv)
        prefix_len = torch.randint(1, prefix_cap + 1, (groups + 1,))
        prefix_len[groups] = 0  # the scratch group: prefill padding writes there, nothing counts it
        row_len = torch.randint(0, suffix_cap - 1, (rows + 1,))
        row_len[rows] = 0  # the spare row never holds a request
        live = torch.tensor(sorted({0, rows - 1, rows // 2}) + [rows, rows])
        query = torch.randn(len(live), heads, 1, dim)
        entries = None
        if q_rows > 1:
            entries = torch.from_numpy(group_entries(live.numpy(), q_rows, entry_capacity(len(live), groups, q_rows), groups))
        p_range, s_range = torch.arange(prefix_cap), torch.arange(suffix_cap)
        bias_p = torch.zeros(groups, prefix_cap).masked_fill(p_range[None] >= prefix_len[:groups, None], float("-inf"))
        bias_s = torch.zeros(rows, suffix_cap).masked_fill(s_range[None] > row_len[:rows, None], float("-inf"))
        torch_step = AttentionStep(kv, "rows", rows_per_group=q_rows, write_pos=row_len, groups_limit=groups, live=live,
                                   prefix_bias=bias_p[:, None, None], suffix_bias=bias_s[:, None, None])
        expected = _rows_attention(torch_step, 0, query, dim ** -0.5)
        triton_step = AttentionStep(kv, "rows", rows_per_group=q_rows, write_pos=row_len, groups_limit=groups, live=live,
                                    prefix_lengths=prefix_len, triton_splits=2, entries=entries)
        got = _rows_attention(triton_step, 0, query, dim ** -0.5)
        real = live < rows  # the spare entries' outputs are thrown away
        error = ((got[real] - expected[real]).norm() / expected[real].norm()).item()
        assert error < 1e-5, ("route", q_rows, cache, error)
        assert torch.isfinite(got).all()

        # the whole layer step: new keys/values written (by the kernel itself, except into an fp8
        # cache) and attended, against the torch route's indexed writes; spare entries excluded
        class Layer:
            layer_idx = 0

        key = torch.randn(len(live), kv_heads, 1, dim)
        value = torch.randn(len(live), kv_heads, 1, dim)
        key[~real], value[~real] = 0.0, 0.0  # (padding entries all write the spare row: keep them equal)
        saved = [t.clone() for t in (kv.suffix_k, kv.suffix_v)]
        want = _rows_step(Layer(), torch_step, query, key, value, dim ** -0.5)
        want_cache = [t.clone() for t in (kv.suffix_k, kv.suffix_v)]
        kv.suffix_k.copy_(saved[0])
        kv.suffix_v.copy_(saved[1])
        assert _kernel_writes(triton_step, query) == (cache != FP8)
        have = _rows_step(Layer(), triton_step, query, key, value, dim ** -0.5)
        error = ((have[real] - want[real]).norm() / want[real].norm()).item()
        assert error < 1e-5, ("step", q_rows, cache, error)
        for mine, theirs in zip((kv.suffix_k, kv.suffix_v), want_cache):
            assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), ("cache", q_rows, cache)

    # suffix prefill: T question tokens per row of some groups, against their prefix and
    # their own causal suffix (the torch path is the reference)
    from dvl_batch.engine.triton_suffix import suffix_prefill_attention

    for q_rows, heads, kv_heads, new, cache in [
        (5, 2, 2, 7, torch.float32), (3, 4, 2, 30, torch.float32), (1, 2, 1, 4, torch.float32),
        (5, 2, 2, 7, FP8), (3, 4, 2, 30, FP8),
    ]:
        dim, prefix_cap, suffix_cap, all_groups = 16, 70, 40, 4
        kv = SlotKV.allocate(1, all_groups, all_groups * q_rows, kv_heads, prefix_cap, suffix_cap, dim, cache, "cpu")
        fill(kv)
        prefix_all = torch.randint(1, prefix_cap + 1, (all_groups,))
        groups = torch.tensor([2, 0])
        rows = (groups[:, None] * q_rows + torch.arange(q_rows)[None]).reshape(-1)
        batch = len(rows)
        query = torch.randn(batch, new, heads, dim).transpose(1, 2)  # as the attention layer hands it over
        prefix_range, suffix_range = torch.arange(prefix_cap), torch.arange(suffix_cap)
        prefix_bias = torch.zeros(len(groups), prefix_cap).masked_fill(
            prefix_range[None] >= prefix_all[groups][:, None], float("-inf"))
        causal = suffix_range[None, :] <= torch.arange(new)[:, None]
        suffix_bias = torch.zeros(new, suffix_cap).masked_fill(~causal, float("-inf"))[None, None].expand(batch, 1, -1, -1)
        step = AttentionStep(kv, "rows", groups=groups, rows=rows, rows_per_group=q_rows,
                             prefix_bias=prefix_bias[:, None, None], suffix_bias=suffix_bias)
        expected = _rows_attention(step, 0, query.contiguous(), dim ** -0.5)
        got = suffix_prefill_attention(query, kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                                       prefix_all, groups, rows, q_rows, dim ** -0.5)
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < 1e-5, ("suffix", q_rows, heads, kv_heads, new, error)
    print("ok")
    """
)


def test_triton_decode_matches_torch_path_in_interpreter():
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """The real compiler (to sm_90 machine code) rejects what the interpreter accepts, e.g.
    variables whose types differ between branches; catch that on CPU-only CI."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dvl_batch.engine import triton_decode as td
    from dvl_batch.engine import triton_quantize as tq
    from dvl_batch.engine import triton_suffix as ts

    cases = [
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=5, QPAD=16, D=128, BLOCK_N=64, SPLITS=2, TILES=5, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.bfloat16, FMA_PREFIX=False, INDEXED=False,
                                 GROUPED=False, WRITE=False, PARTS=3), "bf16"),
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=1, QPAD=16, D=128, BLOCK_N=128, SPLITS=1, TILES=5, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.bfloat16, FMA_PREFIX=False, INDEXED=True,
                                 GROUPED=False, WRITE=False, PARTS=2), "bf16"),
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=1, QPAD=16, D=128, BLOCK_N=64, SPLITS=1, TILES=10, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.float16, FMA_PREFIX=False, INDEXED=False,
                                 GROUPED=False, WRITE=False, PARTS=2), "fp8e4nv"),  # --kv-dtype fp8
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=1, QPAD=16, D=128, BLOCK_N=64, SPLITS=2, TILES=5, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.float16, FMA_PREFIX=True, INDEXED=True,
                                 GROUPED=False, WRITE=False, PARTS=3), "fp8e4nv"),
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=5, QPAD=16, D=128, BLOCK_N=64, SPLITS=1, TILES=10, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.bfloat16, FMA_PREFIX=False, INDEXED=False,
                                 GROUPED=True, WRITE=False, PARTS=2), "bf16"),  # VQA decode over the live groups
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=5, QPAD=16, D=128, BLOCK_N=64, SPLITS=2, TILES=5, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.float16, FMA_PREFIX=False, INDEXED=False,
                                 GROUPED=True, WRITE=False, PARTS=3), "fp8e4nv"),  # ... over an fp8 cache
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=1, QPAD=16, D=128, BLOCK_N=128, SPLITS=1, TILES=5, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.bfloat16, FMA_PREFIX=False, INDEXED=True,
                                 GROUPED=False, WRITE=True, PARTS=2), "bf16"),  # caption decode storing its new keys
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=5, QPAD=16, D=128, BLOCK_N=64, SPLITS=1, TILES=10, IEEE=False,
                                 SUFFIX_BLOCK_N=32, MMA=triton.language.bfloat16, FMA_PREFIX=False, INDEXED=False,
                                 GROUPED=True, WRITE=True, PARTS=2), "bf16"),
        (td._combine_kernel, dict(HEADS=16, D=128, PARTS=2, PARTS_PAD=2), "bf16"),
        (ts._shared_prefix_kernel, dict(HEADS=16, REP=1, QPAD=64, D=128, BLOCK_N=64, SPLITS=1, TILES=10, IEEE=False,
                                        MMA=triton.language.bfloat16, PARTS=2), "bf16"),
        (ts._shared_prefix_kernel, dict(HEADS=16, REP=1, QPAD=64, D=128, BLOCK_N=64, SPLITS=1, TILES=10, IEEE=False,
                                        MMA=triton.language.float16, PARTS=2), "fp8e4nv"),
        (ts._suffix_tokens_kernel, dict(HEADS=16, REP=1, D=128, BLOCK_N=32, PARTS=2), "fp8e4nv"),
        (tq._quantize_rows_kernel, dict(BLOCK=8192), "bf16"),  # --quantize fp8: activations per row
    ]
    for kernel, consts, kv_type in cases:
        signature = {}
        for name in kernel.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name in ("PK", "PV", "SK", "SV", "CK", "CV"):
                signature[name] = f"*{kv_type}"
            elif name in ("Q", "OUT", "X", "KN", "VN"):
                signature[name] = "*fp8e4nv" if (kernel is tq._quantize_rows_kernel and name == "OUT") else "*bf16"
            elif name in ("ACC", "M", "L", "SCALE"):
                signature[name] = "*fp32"
            elif name in ("PLEN", "RLEN", "GROUPS", "ROWS", "LIVE", "ENT_G", "ENT_S", "ENT_N"):
                signature[name] = "*i64"
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        constexprs = {(kernel.arg_names.index(k),): v for k, v in consts.items()}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32))
        except RuntimeError as exc:  # no ptxas in this triton build: the IR stages still ran
            if "ptxas" not in str(exc):
                raise
            continue
        assert "ptx" in compiled.asm


def test_default_launch_parameters_follow_the_measured_cases_only():
    from dvl_batch.engine.triton_decode import (
        BF16_ONE_ROW_CONFIG,
        DEFAULT_CONFIG,
        FP8_ONE_ROW_CONFIG,
        default_config,
    )

    assert default_config(torch.float8_e4m3fn, 1) is FP8_ONE_ROW_CONFIG
    assert default_config(torch.bfloat16, 1) is BF16_ONE_ROW_CONFIG
    assert default_config(torch.float32, 1) is DEFAULT_CONFIG  # a 128-key float32 tile overflows Ada's shared memory
    assert default_config(torch.bfloat16, 5) is DEFAULT_CONFIG


ENGINE_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import dvl_batch.engine.slots as slots
    from dvl_batch.config.spec import BatchSpec, GenerationSpec
    from dvl_batch.engine.continuous import SlotEngine
    from dvl_batch.engine.model import VisionLanguageModel
    from tests.test_engine_parity import _items, generate_references

    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
    processor = AutoProcessor.from_pretrained(sys.argv[1])
    eos = processor.tokenizer.eos_token_id
    slots._triton_splits = lambda layout, vlm, device: 1  # the CUDA route, its kernels interpreted
    for questions, batch_size in ((1, 2), (3, None)):
        items, views = _items(processor, lambda uid: 1 + uid % questions)
        items = items[:3]
        refs = generate_references(model, views, items, eos, max_new=6)
        engine = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=6),
                            BatchSpec(batch_size=batch_size), [eos], eos)
        got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
        assert engine.store.decoder.grouped == (engine.layout.rows_per_group > 1)
        bad = [k for k in refs if got.get(k) != refs[k]]
        assert not bad, (questions, len(bad), len(refs))
    print("ok")
    """
)


def test_slot_engine_through_the_triton_route_matches_generate_in_interpreter(tiny_model_dir):
    """The whole slot engine as it runs on CUDA (compacted caption rows, VQA group entries, the
    kernel's own key/value writes, the Triton question prefill), its kernels in Triton's CPU
    interpreter: every answer equals generate's (float32, greedy)."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", ENGINE_CHECK, str(tiny_model_dir)], env=env, capture_output=True,
                            text=True, timeout=600, cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
