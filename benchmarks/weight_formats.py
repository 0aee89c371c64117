"""Device time of the 1.3B language model's linear layers in each weight format, side by side.

Counts before building: the slot engine multiplies hundreds to tens of thousands of rows at
once (decode steps of ~800-2048 rows, prefix prefill of 32 x 616 tokens), so its linear
layers are compute-bound, and a weight format only pays where its kernel multiplies faster
than bfloat16, not where it only reads fewer bytes. This times one decoder layer's
projections (q, k, v, o, gate, up, down of the 1.3B shape) and the LM head, per format, at
the row counts the engine runs, eager and under torch.compile (where the activation
quantisation fuses into one kernel), with CUDA events.

Formats: bf16 (the reference); fp8 e4m3 weights per output channel with per-row dynamic
activations through torch._scaled_mm (what the engine's `--quantize fp8` builds); and,
where torchao is importable, torchao's float8 (per row), int8 weight-only and int4
weight-only layers. A format that fails to build or run gets its error in the table.

    python3 benchmarks/weight_formats.py --out weight-formats.json
    python3 benchmarks/weight_formats.py --sets vision --rows 18432 --formats "bf16,fp8 rowwise (ours)" --out vision-fp8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYER = {"q": (2048, 2048), "k": (2048, 2048), "v": (2048, 2048), "o": (2048, 2048),
         "gate": (2048, 5632), "up": (2048, 5632), "down": (5632, 2048)}
HEAD = {"lm_head": (2048, 102400)}
# One SigLIP-L layer (q, k, v, out, fc1, fc2) and the aligner's two products: the vision side
# that `--quantize fp8` leaves in bf16 today (~0.5 ms of products per image on the H200, 0i).
# Its rows are 576 patches per image: 18432 for a prefill of 32 images.
VISION = {"q": (1024, 1024), "k": (1024, 1024), "v": (1024, 1024), "o": (1024, 1024), "fc1": (1024, 4096),
          "fc2": (4096, 1024), "aligner_in": (1024, 2048), "aligner_out": (2048, 2048)}
SETS = {"layer": LAYER, "lm_head": HEAD, "vision": VISION}


def timed(fn) -> float:
    """Median device seconds of fn() over 7 calls after two warm-ups (compiled layers settle)."""
    from dvl_batch.bench.device_time import median_device_seconds

    return median_device_seconds(fn, repeats=7, warmups=2)


def linears(shapes: dict[str, tuple[int, int]]) -> torch.nn.ModuleDict:
    """bf16 nn.Linear layers of the given (in, out) shapes, small random weights."""
    layers = torch.nn.ModuleDict({name: torch.nn.Linear(k, n, bias=False) for name, (k, n) in shapes.items()})
    for layer in layers.values():
        torch.nn.init.normal_(layer.weight, std=0.02)
    return layers.to("cuda", torch.bfloat16)


def our_fp8(layers: torch.nn.ModuleDict) -> torch.nn.ModuleDict:
    from dvl_batch.engine.fp8_linear import to_fp8_linears

    converted = copy.deepcopy(layers)
    to_fp8_linears(converted, lambda _name, _module: True, min_rows=0)  # float8 at every row count
    return converted


def torchao_format(mode: str):
    """The layers converted by torchao with the config `--quantize MODE --engine generate` uses."""

    def convert(layers: torch.nn.ModuleDict) -> torch.nn.ModuleDict:
        from dvl_batch.engine.quantize import import_torchao, int4_group_size, make_config

        quantization = import_torchao()
        converted = copy.deepcopy(layers)
        config = make_config(mode, quantization, int4_group_size(list(converted.values())))
        quantization.quantize_(converted, config)
        return converted

    return convert


FORMATS = {
    "bf16": lambda layers: layers,
    "fp8 rowwise (ours)": our_fp8,
    "torchao fp8 rowwise": torchao_format("fp8"),
    "torchao int8wo": torchao_format("int8wo"),
    "torchao int8dq": torchao_format("int8dq"),
    "torchao int4wo": torchao_format("int4wo"),
}


def forward(layers: torch.nn.ModuleDict, inputs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Every projection of the set once, on an input of its width (outputs returned, so that
    torch.compile cannot drop the work as dead code)."""
    return [layer(inputs[layer.in_features]) for layer in layers.values()]


def measure(name: str, convert, shapes, rows: int, compiled: bool) -> dict:
    base = linears(shapes)
    inputs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in {k for k, _ in shapes.values()}}
    record = {"format": name, "rows": rows, "compiled": compiled, "layers": ",".join(shapes)}
    try:
        layers = convert(base)
        fn = torch.compile(forward, dynamic=False) if compiled else forward
        with torch.inference_mode():
            record["ms"] = timed(lambda: fn(layers, inputs)) * 1000
            out = {k: layers[k](inputs[layers[k].in_features]) for k in list(shapes)[:1]}
            ref = {k: base[k](inputs[base[k].in_features]) for k in out}
            err = max(((out[k].float() - ref[k].float()).norm() / ref[k].float().norm()).item() for k in out)
            record["rel_error"] = err
        flops = sum(2 * rows * k * n for k, n in shapes.values())
        record["tflops"] = flops / (record["ms"] / 1000) / 1e12
    except Exception as exc:  # a format that cannot run here is a result, not a crash
        from dvl_batch.bench.report import error_text

        record["error"] = error_text(exc)
        traceback.print_exc(limit=2)
    finally:
        torch._dynamo.reset()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,2048,19712", help="row counts: decode steps, prefill of 32 x 616 tokens")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--sets", default="layer,lm_head", help="layer (a decoder layer), lm_head, vision (a SigLIP layer + aligner)")
    parser.add_argument("--out", default="weight-formats.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: weight_formats.py times CUDA matmul kernels; no CUDA device here", file=sys.stderr)
        raise SystemExit(2)
    unknown = [s for s in args.sets.split(",") if s not in SETS] + [f for f in args.formats.split(",") if f not in FORMATS]
    if unknown:
        print(f"error: unknown --sets/--formats {', '.join(unknown)}; sets: {', '.join(SETS)}; formats: {', '.join(FORMATS)}",
              file=sys.stderr)
        raise SystemExit(2)
    results: list[dict] = []
    print(f"{'format':<26} {'layers':<10} {'rows':>6} {'mode':<8} {'ms':>8} {'TFLOP/s':>8} {'vs bf16':>8} {'rel err':>8}")
    for rows in [int(r) for r in args.rows.split(",")]:
        for label in args.sets.split(","):
            shapes = SETS[label]
            for compiled in (False, True):
                base_ms = None
                for name in args.formats.split(","):
                    r = measure(name, FORMATS[name], shapes, rows, compiled)
                    results.append(r)
                    if name == "bf16":
                        base_ms = r.get("ms")
                    mode = "compiled" if compiled else "eager"
                    if "error" in r:
                        print(f"{name:<26} {label:<10} {rows:>6} {mode:<8} error: {r['error']}", flush=True)
                        continue
                    ratio = f"{base_ms / r['ms']:.2f}x" if base_ms else ""
                    print(f"{name:<26} {label:<10} {rows:>6} {mode:<8} {r['ms']:>8.3f} {r['tflops']:>8.0f} {ratio:>8} "
                          f"{r['rel_error']:>8.4f}", flush=True)
                Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
