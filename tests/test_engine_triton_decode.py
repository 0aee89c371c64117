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

triton = pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch
    from dvl_batch.engine.attention import AttentionStep, SlotKV, _rows_attention
    from dvl_batch.engine.triton_decode import choose_splits, decode_attention

    torch.manual_seed(0)
    for q_rows, heads, kv_heads, groups, splits in [(1, 2, 2, 3, 1), (3, 4, 2, 2, 2), (5, 2, 1, 2, 4)]:
        dim, prefix_cap, suffix_cap, layers = 16, 70, 20, 1
        rows = groups * q_rows
        kv = SlotKV.allocate(layers, groups, rows, kv_heads, prefix_cap, suffix_cap, dim, torch.float32, "cpu")
        for t in (kv.prefix_k, kv.prefix_v, kv.suffix_k, kv.suffix_v):
            t.normal_()
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
        got = decode_attention(query[:, :, 0], kv.prefix_k[0], kv.prefix_v[0], kv.suffix_k[0], kv.suffix_v[0],
                               prefix_len, row_len, q_rows, dim ** -0.5, splits)
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < 1e-5, (q_rows, heads, kv_heads, splits, error)
    assert choose_splits(436, 16, 132) == 1 and choose_splits(8, 16, 132) >= 4
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

    cases = [
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=5, QPAD=16, D=128, BLOCK_N=64, SPLITS=2, TILES=5, IEEE=False,
                                 SUFFIX_BLOCK_N=32)),
        (td._decode_kernel, dict(HEADS=16, REP=1, Q_ROWS=1, QPAD=16, D=128, BLOCK_N=128, SPLITS=1, TILES=5, IEEE=False,
                                 SUFFIX_BLOCK_N=32)),
        (td._combine_kernel, dict(HEADS=16, D=128, PARTS=2, PARTS_PAD=2)),
    ]
    for kernel, consts in cases:
        signature = {}
        for name in kernel.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name in ("Q", "PK", "PV", "SK", "SV", "OUT"):
                signature[name] = "*bf16"
            elif name in ("ACC", "M", "L"):
                signature[name] = "*fp32"
            elif name in ("PLEN", "RLEN"):
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
