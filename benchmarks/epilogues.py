"""Device time of the prefill's blocks: MLPs with and without their activation in the matmul; the vision attention's Q/K/V as one product.

Counted before building (caption prefill, H200 traces in BENCHMARKS 0f): the prefill's work
that is not a matmul is ~0.8 ms per image, of which the activations (the vision tower's
GELU, the language model's SiLU-and-multiply) are ~0.2 ms: each reads a product the matmul
has just written to memory and writes its result back. A matmul whose epilogue applies the
activation saves that round trip. This times, per block, at a 32-image prefill's rows:

- the vision MLP (fc1 + tanh GELU + fc2, 18432 rows): torch.compile's default (cuBLAS
  matmuls, a Triton GELU kernel); fc1 through `torch._addmm_activation` (cuBLASLt's
  bias+GELU epilogue, the same tanh approximation, applied to the float32 accumulator);
  and torch.compile with max-autotune (Triton matmul templates into which Inductor may fuse
  the activation);
- the language model's MLP (gate/up + SiLU-and-multiply + down, 19712 rows): the default
  compile against max-autotune;
- the vision attention block (q, k, v, attention, out; 32 images of 576 tokens): transformers'
  three 1024-wide products against one 3072-wide product of the concatenated weights (as the
  decoder layers have), and the one-product form under each SDPA backend. (On the H200 one
  product was 2% faster eager and 11% slower compiled; in the engine's compiled vision tower
  it cost 0.34 ms per image, BENCHMARKS.md 0k, so the engine keeps three.)

Each row prints device ms (CUDA events, median of 7 after warm-ups), achieved TFLOP/s, the
compile seconds, and the error against a float32 reference, so a faster form can be judged
on both speed and agreement before the engine takes it.

    python3 benchmarks/epilogues.py --out epilogues.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VISION = dict(rows=32 * 576, hidden=1024, inner=4096)
LANGUAGE = dict(rows=32 * 616, hidden=2048, inner=5632)
VISION_IMAGES, VISION_HEADS = 32, 16


def vision_weights(hidden: int, inner: int) -> dict[str, torch.Tensor]:
    def w(*shape):
        return (torch.randn(*shape, device="cuda") * 0.02).to(torch.bfloat16)

    return {"w1": w(inner, hidden), "b1": w(inner), "w2": w(hidden, inner), "b2": w(hidden)}


def language_weights(hidden: int, inner: int) -> dict[str, torch.Tensor]:
    return {"gate_up": (torch.randn(2 * inner, hidden, device="cuda") * 0.02).to(torch.bfloat16),
            "down": (torch.randn(hidden, inner, device="cuda") * 0.02).to(torch.bfloat16)}


def vision_mlp(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """SigLIP's MLP as transformers runs it: fc1, tanh GELU, fc2."""
    return F.linear(F.gelu(F.linear(x, p["w1"], p["b1"]), approximate="tanh"), p["w2"], p["b2"])


def vision_mlp_epilogue(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """fc1's bias and GELU in cuBLASLt's epilogue (Inductor keeps this op as a library call)."""
    hidden = torch._addmm_activation(p["b1"], x, p["w1"].t(), use_gelu=True)
    return F.linear(hidden, p["w2"], p["b2"])


def language_mlp(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The engine's fused Llama MLP: one gate/up product, SiLU(gate) * up, the down product."""
    gate, up = F.linear(x, p["gate_up"]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, p["down"])


def vision_attention_weights(hidden: int, inner: int) -> dict[str, torch.Tensor]:
    def w(*shape):
        return (torch.randn(*shape, device="cuda") * 0.02).to(torch.bfloat16)

    p = {f"{n}_w": w(hidden, hidden) for n in "qkvo"} | {f"{n}_b": w(hidden) for n in "qkvo"}
    p["qkv_w"] = torch.cat([p["q_w"], p["k_w"], p["v_w"]])
    p["qkv_b"] = torch.cat([p["q_b"], p["k_b"], p["v_b"]])
    return p


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(VISION_IMAGES, -1, VISION_HEADS, x.shape[-1] // VISION_HEADS).transpose(1, 2)


def _attend(q, k, v, p: dict[str, torch.Tensor]) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
    return F.linear(out.transpose(1, 2).reshape(-1, out.shape[1] * out.shape[-1]), p["o_w"], p["o_b"])


def vision_attention(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """SigLIP's attention as transformers runs it: three products, SDPA, the out product."""
    return _attend(*(_heads(F.linear(x, p[f"{n}_w"], p[f"{n}_b"])) for n in "qkv"), p)


def vision_attention_fused_qkv(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """One product of the concatenated q/k/v weights (what the engine runs), then the same."""
    return _attend(*(_heads(part) for part in F.linear(x, p["qkv_w"], p["qkv_b"]).chunk(3, dim=-1)), p)


def _with_backend(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def form(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return vision_attention_fused_qkv(x, p)

    form.__name__ = f"fused_qkv_{backend_name.lower()}"
    return form


def attention_flops(rows: int, hidden: int, inner: int) -> int:
    """Four rows x hidden x hidden products plus QK^T and PV over each image's 576 tokens."""
    tokens = rows // VISION_IMAGES
    return 4 * 2 * rows * hidden * hidden + 2 * 2 * VISION_IMAGES * tokens * tokens * hidden


def mlp_flops(rows: int, hidden: int, inner: int, products: int) -> int:
    return 2 * rows * hidden * inner * products


def compiled(fn, mode: str):
    """torch.compile in `mode`; "default" is compile's own, "gemm-autotune" tunes only the matmuls
    (mode max-autotune also tunes every element-wise kernel; in the engine's prefix pass the
    matmul tuning measured no faster, BENCHMARKS.md 0k)."""
    if mode == "gemm-autotune":
        return torch.compile(fn, dynamic=False, options={"max_autotune_gemm": True})
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def measure(label: str, fn, x: torch.Tensor, p: dict, reference: torch.Tensor, flops: int, mode: str | None) -> dict:
    """One row: compile (if a mode is given), time, compare with the float32 reference."""
    from dvl_batch.bench.device_time import median_device_seconds

    record: dict = {"block": label, "form": fn.__name__, "mode": mode or "eager"}
    try:
        start = time.perf_counter()
        run = compiled(fn, mode) if mode else fn
        with torch.inference_mode():
            out = run(x, p)
            torch.cuda.synchronize()
            record["compile_s"] = round(time.perf_counter() - start, 1)
            seconds = median_device_seconds(lambda: run(x, p), repeats=7, warmups=3)
        record["ms"] = seconds * 1000
        record["tflops"] = flops / seconds / 1e12
        diff = (out.float() - reference).abs()
        record["max_abs_err"] = diff.max().item()
        record["rel_err"] = (diff.norm() / reference.norm()).item()
    except Exception as exc:  # a form that cannot run here is a result, not a crash
        from dvl_batch.bench.report import error_text

        record["error"] = error_text(exc)
        traceback.print_exc(limit=2)
    finally:
        torch._dynamo.reset()
    return record


def float32_reference(fn, x: torch.Tensor, p: dict) -> torch.Tensor:
    with torch.inference_mode():
        return fn(x.float(), {k: v.float() for k, v in p.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="default,gemm-autotune,max-autotune-no-cudagraphs",
                        help="torch.compile modes to try besides eager ('default' is compile's own; "
                             "'gemm-autotune' tunes only the matmuls)")
    parser.add_argument("--blocks", default="vision MLP,language MLP,vision attn",
                        help="which blocks to time, comma-separated")
    parser.add_argument("--out", default="epilogues.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: epilogues.py times CUDA kernels; no CUDA device here", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(0)
    modes = [None] + [m for m in args.modes.split(",") if m]
    blocks = [("vision MLP", VISION, vision_weights, (vision_mlp, vision_mlp_epilogue)),
              ("language MLP", LANGUAGE, language_weights, (language_mlp,)),
              ("vision attn", VISION, vision_attention_weights,
               (vision_attention, vision_attention_fused_qkv,
                *(_with_backend(b) for b in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"))))]
    results: list[dict] = []
    print(f"{'block':<13} {'form':<20} {'mode':<27} {'ms':>7} {'TFLOP/s':>8} {'compile s':>9} {'rel err':>9} {'max err':>8}")
    chosen = {b.strip() for b in args.blocks.split(",")}
    for label, shape, make, forms in (b for b in blocks if b[0] in chosen):
        x = torch.randn(shape["rows"], shape["hidden"], device="cuda").to(torch.bfloat16)
        p = make(shape["hidden"], shape["inner"])
        reference = float32_reference(forms[0], x, p)
        flops = (attention_flops(shape["rows"], shape["hidden"], shape["inner"]) if label == "vision attn"
                 else mlp_flops(shape["rows"], shape["hidden"], shape["inner"], 2 if label.startswith("vision") else 3))
        for fn in forms:
            for mode in modes:
                r = measure(label, fn, x, p, reference, flops, mode)
                results.append(r)
                if "error" in r:
                    print(f"{label:<13} {r['form']:<20} {r['mode']:<27} error: {r['error']}", flush=True)
                    continue
                print(f"{label:<13} {r['form']:<20} {r['mode']:<27} {r['ms']:>7.3f} {r['tflops']:>8.0f} {r['compile_s']:>9.1f} "
                      f"{r['rel_err']:>9.2e} {r['max_abs_err']:>8.1e}", flush=True)
                Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                      "results": results}, indent=1))  # kept if a later row is cut off


if __name__ == "__main__":
    main()
