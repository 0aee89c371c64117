"""Prefill attention of the caption workload, every way torch offers, timed on the device.

The H200's caption profile (BENCHMARKS.md 0f) spends ~0.26 ms per image in prefill attention
(cuDNN's kernels at ~300 TFLOP/s, far from the matmuls' ~700) plus copies around it: the
language model's prefill puts S zero queries in front of each prompt's own T so that plain
top-left causal attention over [shared head | own] keys is exact (`attention._after_common`),
then slices the S rows off. This program times, for the two attention shapes of a caption
prefill batch (the vision tower's 576 tokens, 64-dim heads, non-causal; the language model's
S + T tokens, 128-dim heads):

- each SDPA backend torch has here (cuDNN, flash, memory-efficient), eagerly and compiled;
- FlexAttention (Inductor's Triton attention template, compiled) with a few tile choices: the
  vision tower without a mask, the language model's T queries over S + T keys with the causal
  mask aligned bottom-right as a block mask (no zero queries, no query copy);
- for the language model, the zero-query layout against causal attention aligned bottom-right
  (`torch.nn.attention.bias.causal_lower_right`: T queries over S + T keys, no extra rows,
  no copy of the queries with zeros in front) and against a prompt with no shared head (616
  queries, plain causal); the zero-query layout is timed through the engine's own function,
  and every variant returns the [B, T, H, D] copy the engine hands back to the model;

with CUDA events (median of 5 after a warm-up), as ms per image and achieved TFLOP/s of the
useful work, and checks that every variant's output equals the reference's. It prints a
table and writes JSON (name the device in the file name).

Run: python benchmarks/prefill_attention.py --json benchmarks/results/prefill-attention-h200.json
     python benchmarks/prefill_attention.py --small --device cpu   # the shapes shrunk: checks only
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dvl_batch.bench.device_time import median_device_seconds
from dvl_batch.engine.attention import _after_common

BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
# FlexAttention tile choices tried (None: its own defaults for the shape)
FLEX_OPTIONS: tuple[dict | None, ...] = (
    None,
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
)


@dataclass(frozen=True)
class Variant:
    """One way to compute one prefill batch's attention: `queries` rows over `keys` keys."""

    name: str
    queries: int
    keys: int
    dim: int
    causal: str  # "none" | "top-left" | "bottom-right" | "zero-queries"

    def useful_flops(self, batch: int, heads: int) -> float:
        """Multiply-adds of QK^T and PV that the mask keeps (2 FLOP each), for the whole batch:
        what the engine needs, not what a layout spends (zero queries are not useful work)."""
        if self.causal == "none":
            pairs = self.queries * self.keys
        else:  # own query i sees keys 0 .. keys - queries + i
            pairs = self.queries * (self.keys - self.queries) + self.queries * (self.queries + 1) / 2
        return 4.0 * batch * heads * self.dim * pairs


def variants(small: bool, head: int, own: int) -> list[Variant]:
    vision_tokens, vision_dim, lm_dim = (16, 16, 32) if small else (576, 64, 128)
    return [
        Variant("vision tower", vision_tokens, vision_tokens, vision_dim, "none"),
        Variant("LM, no shared head", head + own, head + own, lm_dim, "top-left"),
        Variant("LM, zero queries in front", own, head + own, lm_dim, "zero-queries"),
        Variant("LM, causal bottom-right", own, head + own, lm_dim, "bottom-right"),
    ]


def attention(variant: Variant) -> Callable[..., torch.Tensor]:
    """The computation for `variant`: q [B, H, queries, D] over k, v [B, H, keys, D] -> a contiguous
    [B, queries, H, D], the layout the engine's attention hands back to the model."""
    if variant.causal == "zero-queries":  # the engine's own code for its layout today
        return lambda q, k, v: _after_common(q, k, v, q.shape[2], q.shape[-1] ** -0.5)
    if variant.causal == "bottom-right":
        from torch.nn.attention.bias import causal_lower_right

        def bottom_right(q, k, v):
            mask = causal_lower_right(q.shape[2], k.shape[2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).contiguous()
        return bottom_right
    causal = variant.causal == "top-left"
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).contiguous()


def flex_attention(variant: Variant, options: dict | None, device: torch.device) -> Callable[..., torch.Tensor]:
    """`variant` through compiled FlexAttention: no mask for the vision tower, else each of the
    T own queries sees the S head keys and its own causal prefix (bottom-right causal)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    compiled = torch.compile(flex, dynamic=False)
    block_mask = None
    if variant.causal != "none":
        offset = variant.keys - variant.queries

        def bottom_right(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        block_mask = create_block_mask(bottom_right, None, None, variant.queries, variant.keys, device=device)
    kwargs = {"kernel_options": options} if options else {}
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, **kwargs).transpose(1, 2).contiguous()


def measure(variant: Variant, tensors, reference: torch.Tensor, backend: str | None, compiled: bool,
            batch: int, heads: int, flex_options: dict | None = None) -> dict:
    """One row: ms per image, useful TFLOP/s and the largest difference from the reference.
    backend "FLEX" times FlexAttention with `flex_options` (always compiled)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = tensors
    row = {"variant": variant.name, "backend": backend or "default", "compiled": compiled}
    if backend == "FLEX":
        row["flex_options"] = flex_options
        try:
            fn = flex_attention(variant, flex_options, q.device)
        except Exception as exc:  # noqa: BLE001 - an API this torch lacks
            row["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            return row
        backend = None
    else:
        fn = attention(variant)
        if compiled:
            fn = torch.compile(fn, dynamic=False)
    chosen = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()  # None: torch picks
    try:
        with torch.inference_mode(), chosen:
            out = fn(q, k, v).transpose(1, 2)  # back to [B, H, queries, D], as the reference
            seconds = median_device_seconds(lambda: fn(q, k, v), on_cuda=q.is_cuda)
    except Exception as exc:  # noqa: BLE001 - a backend (or tile choice) that refuses this shape
        row["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return row
    row["max_abs_diff"] = float((out[:, :, -reference.shape[2]:].float() - reference).abs().max())
    row["ms_per_image"] = seconds * 1000 / batch
    row["tflops"] = variant.useful_flops(batch, heads) / seconds / 1e12
    return row


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, heads, head, own = (2, 2, 5, 23) if args.small else (args.batch, 16, args.head, args.own)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def make(length: int, dim: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, dim, generator=generator).to(device, dtype)

    rows = []
    backends = [None, *BACKENDS] if device.type == "cuda" else [None]
    whole = None  # the whole prompt's q, k, v: every LM layout computes its last `own` rows
    for variant in variants(args.small, head, own):
        if variant.name == "vision tower":
            tensors = tuple(make(variant.keys, variant.dim) for _ in range(3))
        else:
            whole = whole or tuple(make(variant.keys, variant.dim) for _ in range(3))
            tensors = (whole[0][:, :, -variant.queries:], whole[1], whole[2])
        with torch.inference_mode():  # float32 math on the same numbers: what every backend should give
            q, k, v = (t.float() for t in tensors)
            if variant.name == "vision tower":
                reference = F.scaled_dot_product_attention(q, k, v)
            else:
                full = tuple(t.float() for t in whole)
                reference = F.scaled_dot_product_attention(*full, is_causal=True)[:, :, -own:]
        for compiled in (False, True):
            for backend in backends:
                rows.append(measure(variant, tensors, reference, backend, compiled, batch, heads))
        if variant.causal in ("none", "bottom-right"):  # the two masks FlexAttention needs no layout for
            for options in FLEX_OPTIONS if device.type == "cuda" else FLEX_OPTIONS[:1]:
                rows.append(measure(variant, tensors, reference, "FLEX", True, batch, heads, options))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<27} {'backend':<20} {'compiled':>8} {'ms/image':>9} {'TFLOP/s':>8}  note")
    for row in rows:
        note = row.get("error") or f"max |diff| vs float32 reference {row['max_abs_diff']:.1e}"
        if row.get("flex_options"):
            note += f" {row['flex_options']}"
        ms = f"{row['ms_per_image']:.4f}" if "ms_per_image" in row else "-"
        tf = f"{row['tflops']:.0f}" if "tflops" in row else "-"
        print(f"{row['variant']:<27} {row['backend']:<20} {str(row['compiled']):>8} {ms:>9} {tf:>8}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32, help="images per prefill batch (the engine's default)")
    parser.add_argument("--head", type=int, default=31, help="shared prompt-head tokens (the bench prompt's)")
    parser.add_argument("--own", type=int, default=585, help="each prompt's own tokens after the head")
    parser.add_argument("--small", action="store_true", help="tiny shapes: checks the program, times nothing real")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = run(args)
    print_table(rows)
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "torch": torch.__version__, "batch": args.batch, "head": args.head, "own": args.own}
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=2)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
