"""float8 linear layers for `--quantize fp8`: e4m3 weights per output channel, activations per row.

The slot engine multiplies hundreds (decode) to tens of thousands (prefill) of rows per
call, so its linear layers are bound by the matmul rate, not by reading weights: a format
pays only if its kernel multiplies faster. Hopper's float8 tensor cores do (twice the
bfloat16 rate), through `torch._scaled_mm` with one scale per weight row and one per
activation row. Activations are quantised on the fly (the row's absolute maximum maps to
448, e4m3's largest value); under torch.compile that fuses into the kernel before.

Only large products take the float8 path: measured, float8 loses to bfloat16 at the row
counts of a decode step (see `FP8_MIN_ROWS`), so each layer keeps its bfloat16 weight
for those (1.5x the weights' memory: a 1.3B model's language weights are ~2.7 GB in
bfloat16) and decode stays exactly what bf16 computes.

Written here rather than taken from torchao: torchao's float8 layers are tensor
subclasses over the same `torch._scaled_mm`, whose compile path made inductor autotune
for minutes in the slot engine's compiled passes; a plain module compiles like any other
(`benchmarks/weight_formats.py` times both side by side). Off CUDA the same arithmetic
runs in float32 (dequantised), so the CPU suite checks the quantisation itself.

The activation quantisation matters as much as the product: in eager torch (the CUDA
graphs of the decode step) it is six element-wise passes over the rows, which measured
slower than the bfloat16 product it feeds (`benchmarks/weight_formats.py`: 0.35x at 1024
rows). On CUDA it is one Triton kernel (a row's maximum, scale and e4m3 values in one
read); inside torch.compile the torch expression is kept, since inductor fuses it with
the norm before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

E4M3_MAX = 448.0
# Fewer rows than this multiply in bfloat16. Measured on an H200 (benchmarks/weight_formats.py,
# one decoder layer's projections): float8 rowwise is 1.42x bfloat16 at 19712 rows (a prefill
# batch) but 0.59x at 1024 (a decode step: the N = 2048 products of few rows run in poor tiles).
# Every decode step has at most 2048 rows, so decode stays exact bf16 and prefill gets float8.
FP8_MIN_ROWS = 4096
_TINY = 1e-12  # a zero row's scale; its quantised values are all zero anyway


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales [rows, 1] such that values * scales ~= x, per row (x is 2-D)."""
    if x.is_cuda and not torch.compiler.is_compiling() and x.shape[0] > 0:
        from .triton_quantize import quantize_rows_fp8

        return quantize_rows_fp8(x)
    return quantize_rows_torch(x)


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` in torch operations (CPU, torch.compile, and the kernel's reference)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    values = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


class Fp8Linear(torch.nn.Module):
    """A linear layer with a float8 e4m3 copy of its weight (one scale per output row), used
    for products of at least `min_rows` rows; smaller ones use the original weight."""

    def __init__(self, linear: torch.nn.Linear, weight: torch.Tensor, weight_scale: torch.Tensor,
                 min_rows: int = FP8_MIN_ROWS):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.min_rows = min_rows
        self.linear = linear
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)  # [1, out] float32

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, min_rows: int = FP8_MIN_ROWS) -> Fp8Linear:
        with torch.no_grad():
            values, scale = quantize_rows(linear.weight.detach())
        return cls(linear, values, scale.reshape(1, -1).contiguous(), min_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] < self.min_rows:
            return self.linear(x)
        values, scale = quantize_rows(rows)
        if x.is_cuda:
            out = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=x.dtype)
        else:
            out = self.dequantized_product(values, scale).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized_product(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The same product in float32: what `_scaled_mm` computes, up to its accumulation order."""
        weight = self.weight.float() * self.weight_scale.reshape(-1, 1)
        out = (values.float() * scale) @ weight.t()
        return out if self.bias is None else out + self.bias.float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 from {self.min_rows} rows"


def fp8_supported(linear: torch.nn.Linear) -> bool:
    """`_scaled_mm` wants both widths to be multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def to_fp8_linears(root: torch.nn.Module, chosen: Callable[[str, torch.nn.Module], bool],
                   min_rows: int = FP8_MIN_ROWS) -> int:
    """Replace the chosen nn.Linear children (at any depth) by Fp8Linear; returns how many."""
    replaced = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is torch.nn.Linear and fp8_supported(child) and chosen(full, child):
                setattr(module, child_name, Fp8Linear.from_linear(child, min_rows))
                replaced += 1
    return replaced
