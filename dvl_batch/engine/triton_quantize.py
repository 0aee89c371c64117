"""Per-row float8 quantisation of activations in one pass (Triton), for `Fp8Linear`.

Each program reads one row once: its absolute maximum gives the scale (maximum / 448,
e4m3's largest value), and the same registers are scaled, clamped and stored as e4m3.
The arithmetic is what eager torch does for `fp8_linear.quantize_rows_torch` on CUDA,
operation for operation, so both give the same bits: the scale is the maximum times
1/448 (torch divides by a scalar that way), the values a correctly rounded float32
division (`div_rn`: Triton's `/` is the approximate `div.full`, which measured a few
values one e4m3 step off), then a round-to-nearest-even cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
INV_E4M3_MAX: tl.constexpr = tl.constexpr(1.0 / 448.0)  # torch's CUDA division by a scalar multiplies by its inverse


@triton.jit
def _quantize_rows_kernel(X, OUT, SCALE, n_cols, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cols
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * INV_E4M3_MAX
    values = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(OUT + row * n_cols + offs, values.to(OUT.dtype.element_ty), mask=ok)
    tl.store(SCALE + row, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values [rows, cols] (contiguous) and float32 scales [rows, 1] of a 2-D tensor."""
    rows, cols = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    values = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    with torch.cuda.device(x.device):  # Triton launches on the current device; --device-map spreads layers
        _quantize_rows_kernel[(rows,)](x, values, scale, cols, x.stride(0), BLOCK=block,
                                       num_warps=8 if block >= 4096 else 4)
    return values, scale
