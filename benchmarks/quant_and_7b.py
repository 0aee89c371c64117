"""Quantization and the 7B hybrid on one GPU: throughput and memory with the real shapes.

Random weights with the real checkpoint shapes, built from DeepseekVLConfig /
DeepseekVLHybridConfig (nothing is downloaded):

- 1.3B: Llama text hidden 2048, 24 layers, 16 heads, FFN 5632, vocab 102400;
  SigLIP-L/16 at 384px (hidden 1024, 24 layers, 16 heads, FFN 4096).
- 7B hybrid: text hidden 4096, 30 layers, 32 heads, FFN 11008, the same SigLIP, plus
  SAM ViT-B at 1024px.

For each model and each weight format (bf16, and torchao int8wo / int4wo / fp8 where
the device supports them) it times the slot engine and transformers' generate
(the `--engine generate` path) on the caption-varlen profile: one image per request,
~616 prompt tokens, max_new_tokens 128, request i forced to stop after
16 + (i*37 % 113) tokens (mean ~72), the stop schedule of BENCHMARKS.md. It reports
images/s, generated tokens/s, the model's resident memory and the peak memory.
Finally the 7B-shape model runs through the whole pipeline (shards -> decode workers
-> slot engine -> parquet parts) on the bundled examples, with the tiny hybrid's
tokenizer and processor.

Tokens are gibberish (random weights), so this measures speed and memory, not
quality: quantization error must be judged with the real checkpoints.

    python benchmarks/quant_and_7b.py                       # CUDA, < 8 minutes on one H100
    python benchmarks/quant_and_7b.py --scale tiny --device cpu --requests 8   # code-path smoke test

Writes a JSON report (--json, default benchmarks/results/quant_and_7b.json) and prints
a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from dvl_batch.config.spec import BatchSpec, GenerationSpec  # noqa: E402
from dvl_batch.engine.continuous import SlotEngine  # noqa: E402
from dvl_batch.engine.generate import GenerateEngine  # noqa: E402
from dvl_batch.engine.model import VisionLanguageModel  # noqa: E402
from dvl_batch.engine.types import EnginePrompt, WorkItem  # noqa: E402
from dvl_batch.preprocess.images import decode_image, render_views, views_from_image_processor  # noqa: E402
from dvl_batch.preprocess.prompts import PromptRenderer  # noqa: E402

MODES = ("bf16", "int8wo", "int4wo", "fp8")
SIGLIP_L_384 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16)
SHAPES: dict[str, dict[str, Any]] = {
    "1.3b": dict(
        hybrid=False,
        text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  vocab_size=102400, max_position_embeddings=16384),
        vision=SIGLIP_L_384,
    ),
    "7b": dict(
        hybrid=True,
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=102400, max_position_embeddings=16384),
        vision=SIGLIP_L_384,
        high_res=dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12, image_size=1024,
                      patch_size=16, global_attn_indexes=[2, 5, 8, 11], window_size=14, mlp_dim=3072),
    ),
}
# Same code paths with a few narrow layers: lets the script itself be checked on a CPU.
TINY_SCALE = {
    "1.3b": dict(hybrid=False, text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=4096),
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=384, patch_size=16)),
    "7b": dict(hybrid=True, text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4, vocab_size=1024, max_position_embeddings=4096),
               vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=384, patch_size=16),
               high_res=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=1024,
                             patch_size=16, global_attn_indexes=[1], window_size=7, mlp_dim=64)),
}


@dataclass
class Measurement:
    """One (model, weights, engine) run."""

    model: str
    weights: str
    engine: str
    requests: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    tokens_per_second: float = 0.0
    generated_tokens: int = 0
    model_gib: float = 0.0
    peak_gib: float = 0.0
    slots: int = 0
    note: str = ""
    error: str | None = None


@dataclass
class Report:
    device: str
    environment: dict[str, Any]
    settings: dict[str, Any]
    runs: list[Measurement] = field(default_factory=list)
    pipeline_7b: dict[str, Any] = field(default_factory=dict)


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def torchao_version() -> str | None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError:
        return None
    return getattr(torchao, "__version__", "unknown")


def supported(mode: str, device: torch.device) -> str | None:
    """None if the mode can run here, else why not (shown in the table)."""
    if mode == "bf16":
        return None
    if torchao_version() is None:
        return "torchao not installed"
    from dvl_batch.engine.quantize import MODES as QUANT_MODES

    need = QUANT_MODES[mode]
    if need.needs_cuda and device.type != "cuda":
        return "needs CUDA"
    if need.min_capability and device.type == "cuda" and torch.cuda.get_device_capability(device) < need.min_capability:
        return f"needs compute capability >= {need.min_capability[0]}.{need.min_capability[1]}"
    return None


def build_model(shape: dict[str, Any], image_token_id: int, eos_id: int, device: torch.device, dtype: torch.dtype):
    """Random weights of the given shape, created directly on the device."""
    from transformers import AutoModelForImageTextToText

    text = dict(shape["text"], bos_token_id=0, eos_token_id=eos_id, pad_token_id=eos_id)
    if shape["hybrid"]:
        from transformers import DeepseekVLHybridConfig

        config = DeepseekVLHybridConfig(text_config=text, vision_config=dict(shape["vision"]),
                                        high_res_vision_config=dict(shape["high_res"]), image_token_id=image_token_id,
                                        tie_word_embeddings=False)
    else:
        from transformers import DeepseekVLConfig

        config = DeepseekVLConfig(text_config=text, vision_config=dict(shape["vision"]), image_token_id=image_token_id,
                                  tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    return model.eval()


def workload(processor, n_requests: int, max_new_tokens: int) -> list[WorkItem]:
    """One photo and one caption prompt per request, with the varlen stop schedule."""
    views = views_from_image_processor(processor.image_processor)
    photos = sorted(p for p in (REPO / "examples" / "images").iterdir() if p.suffix in (".jpg", ".png"))
    pixels = []
    for path in photos:
        rendered = render_views(decode_image(path.read_bytes(), 10**9), views)
        pixels.append({name: torch.from_numpy(array)[None] for name, array in rendered.items()})
    prompt = PromptRenderer(processor, None).tokenize("Describe this image.", 1)
    items = []
    for i in range(n_requests):
        stop_after = min(max_new_tokens, 16 + (i * 37) % 113)
        items.append(WorkItem(i, pixels[i % len(pixels)], [EnginePrompt(0, prompt.input_ids, prompt.prefix_len, stop_after)]))
    return items


def time_engine(engine, items: list[WorkItem], device: torch.device) -> tuple[float, int]:
    _sync(device)
    started = time.perf_counter()
    done = list(engine.run(iter(items)))
    _sync(device)
    seconds = time.perf_counter() - started
    errors = [c.error for c in done if c.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return seconds, sum(len(c.tokens) for c in done)


def make_engine(kind: str, model, views, eos: int, args, cuda_graphs: bool = True):
    generation = GenerationSpec(max_new_tokens=args.max_new_tokens)
    if kind == "slot":
        engine = SlotEngine(VisionLanguageModel(model), views, generation, BatchSpec(cuda_graphs=cuda_graphs), [eos], eos)
        engine.stop_schedule = True  # the requests carry the profile's stop schedule
        return engine
    return GenerateEngine(model, views, generation, BatchSpec(batch_size=args.generate_batch), [eos], eos)


def measure(name: str, shape, processor, mode: str, args, device: torch.device, report: Report, deadline: float) -> None:
    eos = processor.tokenizer.eos_token_id
    views = views_from_image_processor(processor.image_processor)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engines = [e for e in ("slot", "generate") if e in args.engines]
    why_not = supported(mode, device)
    if why_not:
        report.runs.extend(Measurement(name, mode, e, note=f"skipped: {why_not}") for e in engines)
        return
    _free(device)
    before = _allocated(device)
    model = None
    try:
        model = build_model(shape, processor.image_token_id, eos, device, dtype)
        if mode != "bf16":
            from dvl_batch.engine.quantize import quantize_model

            quantize_model(model, mode, device)
        _free(device)
        model_gib = _gib(_allocated(device) - before)
        for kind in engines:
            if time.monotonic() > deadline:
                report.runs.append(Measurement(name, mode, kind, note="skipped: time budget"))
                continue
            refused = _refused(mode, kind, device)
            if refused:  # what the product refuses is reported, not timed
                report.runs.append(Measurement(name, mode, kind, note=f"refused: {refused}"))
                continue
            report.runs.append(run_engine(kind, name, mode, model, views, eos, processor, args, device, model_gib))
            print(_row(report.runs[-1]), flush=True)
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not lose the others
        report.runs.append(Measurement(name, mode, "build", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        traceback.print_exc()
    finally:
        del model
        _free(device)


def _refused(mode: str, kind: str, device: torch.device) -> str | None:
    """The one-line reason the CLI gives for this format with this engine, or None."""
    from dvl_batch.engine.quantize import check_engine_quantize
    from dvl_batch.errors import UsageError

    if mode == "bf16":
        return None
    try:
        check_engine_quantize(mode, "continuous" if kind == "slot" else "generate", device)
    except UsageError as exc:
        return str(exc)
    return None


def run_engine(kind, name, mode, model, views, eos, processor, args, device, model_gib) -> Measurement:
    n = args.requests if kind == "slot" else args.generate_requests
    if name == "7b":
        n = max(1, n // 2)
    result = Measurement(name, mode, kind, requests=n, model_gib=model_gib)
    graphs = True
    for attempt in range(2):
        try:
            warm = make_engine(kind, model, views, eos, args, graphs)
            time_engine(warm, workload(processor, min(n, 8), args.max_new_tokens), device)  # kernels, cuBLAS, allocator
            del warm
            _free(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            engine = make_engine(kind, model, views, eos, args, graphs)
            seconds, tokens = time_engine(engine, workload(processor, n, args.max_new_tokens), device)
            result.seconds = round(seconds, 2)
            result.generated_tokens = tokens
            result.images_per_second = round(n / seconds, 2)
            result.tokens_per_second = round(tokens / seconds, 1)
            result.peak_gib = _gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0
            result.slots = engine.stats.slots
            result.error = None
            del engine
            return result
        except Exception as exc:  # noqa: BLE001
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            traceback.print_exc()
            _free(device)
            if kind != "slot" or not graphs or device.type != "cuda" or attempt:
                return result
            graphs = False  # retry once without the CUDA graph, and say so
            result.note = "no CUDA graph (capture failed)"
    return result


def pipeline_7b(shape, hybrid_dir: Path, args, device: torch.device) -> dict[str, Any]:
    """The 7B-shape model through sources -> decode workers -> slot engine -> parquet parts.

    Everything but from_pretrained is the production path (DeviceWorker.process minus
    loading): writing 15 GB of random weights to disk first would only time the disk.
    """
    try:
        import pyarrow.parquet as pq

        from dvl_batch.config.spec import JobSpec
        from dvl_batch.engine.model import ResolvedModel
        from dvl_batch.runtime.feed import ShardFeed
        from dvl_batch.runtime.job import job_metadata
        from dvl_batch.runtime.pipeline import process_shards
        from dvl_batch.runtime.worker import build_engine
        from dvl_batch.sink.output import OutputDir
        from dvl_batch.sink.parts import ParquetSink
        from dvl_batch.sources import discover_shards
    except ImportError as exc:
        return {"error": f"the pipeline needs {exc.name}: pip install pyarrow webdataset braceexpand pyyaml"}
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(hybrid_dir)
    tokenizer = processor.tokenizer
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = [str(REPO / "examples" / "shards"), str(REPO / "examples" / "pairs")]  # 1 and 2 images per sample
    model = None
    try:
        model = build_model(shape, processor.image_token_id, tokenizer.eos_token_id, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory() as out_dir:
            spec = JobSpec.from_recipe(
                None, task="vqa", inputs=inputs, output=out_dir, questions=["Describe this image.", "What is the main subject?"],
                max_new_tokens=32, workers=2, progress=False,
            )
            out = OutputDir(out_dir)
            out.prepare()
            try:
                metadata = job_metadata(spec, ResolvedModel(str(hybrid_dir), "7b-shape-random-weights", tiny=False))
                engine = build_engine(spec, model, processor, device)
                feed = ShardFeed(discover_shards(spec.data.inputs, spec.data.shard_size))
                started = time.perf_counter()
                stats = process_shards(spec, str(hybrid_dir), engine, ParquetSink(out, metadata), feed,
                                       lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
                seconds = time.perf_counter() - started
                table = pq.read_table(Path(out_dir) / "parts")
            finally:
                out.lock.release()
        errors = [e for e in table.column("error").to_pylist() if e]
        prompt_tokens = table.column("prompt_tokens").to_pylist()
        return {
            "engine": type(engine).__name__, "shards": stats.shards_written, "samples": stats.samples,
            "rows": table.num_rows, "error_rows": len(errors), "error_examples": sorted(set(errors))[:3],
            "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)], "seconds": round(seconds, 2),
            "peak_gib": _gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0,
            "ok": stats.samples == 12 and table.num_rows == 24 and not errors,  # 6 photos + 2 x 3 pairs, 2 questions
        }
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        del model
        _free(device)


def _row(m: Measurement) -> str:
    status = m.error or m.note
    return (f"| {m.model} | {m.weights} | {m.engine} | {m.requests or ''} | {m.images_per_second or ''} | "
            f"{m.tokens_per_second or ''} | {m.model_gib or ''} | {m.peak_gib or ''} | {m.slots or ''} | {status} |")


def print_table(report: Report) -> None:
    print(f"\n### {report.device}\n")
    print(f"torch {report.environment['torch']}, transformers {report.environment['transformers']}, "
          f"torchao {report.environment['torchao']}; max_new_tokens {report.settings['max_new_tokens']}, varlen stop schedule\n")
    print("| model | weights | engine | requests | img/s | tokens/s | model GiB | peak GiB | slots/batch | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in report.runs:
        print(_row(m))
    print(f"\n7B-shape pipeline end to end: {json.dumps(report.pipeline_7b)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=("real", "tiny"), default="real", help="tiny: narrow layers, for a CPU smoke test")
    parser.add_argument("--models", nargs="+", default=["1.3b", "7b"], choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--engines", nargs="+", default=["slot", "generate"], choices=("slot", "generate"))
    parser.add_argument("--requests", type=int, default=512, help="slot engine requests (halved for 7B)")
    parser.add_argument("--generate-requests", type=int, default=128, help="generate engine requests (halved for 7B)")
    parser.add_argument("--generate-batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out the 7B end-to-end pipeline check")
    parser.add_argument("--budget-s", type=float, default=400, help="skip the remaining runs after this many seconds")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "dvl-bench-cache")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "quant_and_7b.json")
    args = parser.parse_args()
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.monotonic()
    deadline = started + args.budget_s
    device = torch.device(args.device)
    import transformers

    from dvl_batch.tiny import ensure_tiny_model

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = Report(
        device=name,
        environment={"torch": torch.__version__, "transformers": transformers.__version__, "torchao": torchao_version(),
                     "python": platform.python_version()},
        settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    )
    shapes = TINY_SCALE if args.scale == "tiny" else SHAPES
    dirs = {False: ensure_tiny_model(args.cache_dir), True: ensure_tiny_model(args.cache_dir, hybrid=True)}
    from transformers import AutoProcessor

    processors = {name: AutoProcessor.from_pretrained(dirs[shapes[name]["hybrid"]]) for name in args.models}
    # Most important first, so the time budget only ever cuts the tail: bf16 for both
    # models, the 7B pipeline check, then each quantized format.
    for index, mode in enumerate(args.modes):
        for model_name in args.models:
            measure(model_name, shapes[model_name], processors[model_name], mode, args, device, report, deadline)
        if index == 0 and "7b" in args.models and not args.skip_pipeline:
            report.pipeline_7b = pipeline_7b(shapes["7b"], dirs[True], args, device)
            print(f"7B-shape pipeline: {json.dumps(report.pipeline_7b)}", flush=True)
    report.settings["total_seconds"] = round(time.monotonic() - started, 1)
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(report), indent=2))
    print(f"\nwrote {args.json} ({report.settings['total_seconds']} s)")


if __name__ == "__main__":
    main()
