"""`dvl-batch bench`: dvl-batch end to end vs transformers' generate, side by side, one process.

Profile caption-varlen (the team's reference workload): random weights of the real
deepseek-vl-1.3b-chat shape, ~1024px JPEGs in webdataset shards on disk, one prompt
of ~616 tokens (576 image tokens), max_new_tokens 128, and request i forced to stop
after L_i = 16 + (i*37 % 113) tokens by a logits processor emitting EOS (the same rule
in both engines). Random weights never choose EOS by themselves, so the schedule is
what gives answers their realistic spread of lengths.

Both engines see identical inputs (the same preprocessed pixels and token ids). The
generate baseline gets them pre-decoded in memory (kept out of the decoder processes'
forks, arena.py); dvl-batch reads and decodes the shards itself while it runs, and
writes parquet parts. The table reports images/s, useful tokens/s, peak GPU memory, MFU
and the ratio; results go to a JSON file.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config.spec import BatchSpec, DataSpec, GenerationSpec, JobSpec, ModelSpec, OutputSpec, PromptSpec
from ..errors import UsageError
from .arena import keep_out_of_forks
from .corpus import BENCH_SYSTEM_PROMPT, VQA_QUESTIONS, key_index, make_jpeg_shards, stop_after
from .device_time import attach_clock, decode_split
from .entries import compare_answers, compare_with_generate, read_answers, slot_engine_entry, summarise
from .report import format_table
from .shapes import FlopModel, build_model, measured_peak


@dataclass
class BenchConfig:
    profile: str = "caption-varlen"  # caption-varlen | vqa | both | preprocess
    shape: str = "real-1.3b"  # real-1.3b | tiny
    requests: int = 2048
    max_new_tokens: int = 128
    hf_batch_sizes: tuple[int, ...] = (256,)
    hf_cache: str = "static"  # static | dynamic
    skip_hf: bool = False
    batch_size: int | None = None
    prefill_batch: int | None = None
    workers: int | None = None
    images_per_shard: int = 256
    image_side: int = 1024
    data_dir: str | None = None
    device: str = "auto"
    cuda_graphs: bool = True
    compile: bool = True
    compile_decode: bool = True
    triton_attention: bool = True
    overlap_prefill: bool = True
    fuse_projections: bool = True  # the slot engine's one-product Q/K/V and gate/up (engine/fused_layers.py)
    vision_epilogue: bool = True  # SigLIP fc1's bias and GELU in cuBLASLt's epilogue (engine/vision_layers.py)
    kv_dtypes: tuple[str, ...] = ("auto",)  # slot-engine runs per profile: auto (bf16) and/or fp8 KV
    quantize: tuple[str, ...] = ("none",)  # ... times the weight formats: none (bf16) and/or fp8
    paired: bool = False  # ... or the i-th weight format with the i-th KV type only
    check_outputs: bool = True
    host_profile: str | None = None  # write a cProfile of the dvl-batch runs' host side here
    device_profile: str | None = None  # write the measured runs' kernel and idle-gap report here
    out: str = "bench.json"


# ------------------------------------------------------------------ model


# ------------------------------------------------------------------ runs


def _spec(
    cfg: BenchConfig, task: str, inputs: list[Path], out: Path, model_path: str, device: str, kv_dtype: str = "auto",
    quantize: str = "none",
) -> JobSpec:
    prompt = PromptSpec(task=task, system_prompt=BENCH_SYSTEM_PROMPT, questions=VQA_QUESTIONS if task == "vqa" else ())
    return JobSpec(
        model=ModelSpec(name=model_path, device=device, kv_dtype=kv_dtype, quantize=quantize),
        prompt=prompt,
        generation=GenerationSpec(max_new_tokens=cfg.max_new_tokens),
        data=DataSpec(inputs=tuple(str(p) for p in inputs), workers=cfg.workers),
        batch=BatchSpec(
            batch_size=cfg.batch_size, prefill_batch=cfg.prefill_batch, cuda_graphs=cfg.cuda_graphs, compile=cfg.compile,
            compile_decode=cfg.compile_decode, triton_attention=cfg.triton_attention,
            overlap_prefill=cfg.overlap_prefill, fuse_projections=cfg.fuse_projections,
            vision_epilogue=cfg.vision_epilogue,
        ),
        output=OutputSpec(path=str(out)),
    )


def _prepare_in_memory(spec: JobSpec, model_path: str, shards: list[Path]):
    """Decode every sample once (for the generate baseline and the per-core decode rate)."""
    from ..preprocess.preparer import SamplePreparer
    from ..records import ShardEnd
    from ..sources import discover_shards, read_shard

    preparer = SamplePreparer(spec, model_path)
    samples, seconds = [], 0.0
    for shard in discover_shards([str(p) for p in shards], spec.data.shard_size):
        for raw in read_shard(shard):
            if isinstance(raw, ShardEnd):
                continue
            started = time.perf_counter()
            samples.append(preparer.prepare(raw, shard))
            seconds += time.perf_counter() - started
    return samples, seconds


def _work_items(samples, n_questions: int):
    from ..engine.types import EnginePrompt, WorkItem

    items = []
    for uid, sample in enumerate(samples):
        index = key_index(sample.key)
        prompts = [
            EnginePrompt(q, r.input_ids, r.prefix_len, stop_after(index * n_questions + q))
            for q, r in enumerate(sample.requests)
        ]
        items.append(WorkItem(uid, {k: torch.from_numpy(v) for k, v in sample.pixels.items()}, prompts))
    return items


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def run_generate(model, processor, views, items, cfg: BenchConfig, batch_size: int) -> dict[str, Any]:
    from ..engine.generate import GenerateEngine
    from ..runtime.worker import eos_ids

    eos = eos_ids(processor, model)
    cache = cfg.hf_cache if torch.cuda.is_available() else None
    engine = GenerateEngine(
        model, views, GenerationSpec(max_new_tokens=cfg.max_new_tokens), BatchSpec(batch_size=batch_size), eos, eos[0],
        cache_implementation=cache,
    )
    warm = items[:batch_size]
    list(engine.run(iter(warm)))  # compiles the static-cache decode for this batch size
    _reset_peak()
    started = time.perf_counter()
    results = {(items[c.uid].uid, c.index): c for c in engine.run(iter(items))}
    _sync()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "completions": results, "peak_gib": _peak_gib()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_dvl(
    spec: JobSpec, worker, shards: list[Path], warm_shards: list[Path], n_questions: int, profiles: tuple = (None, None)
) -> dict[str, Any]:
    """The measured dvl-batch run (after a warm-up run on other shards); `profiles` is
    (host cProfile path, device profile path), each optional."""
    from ..runtime.feed import ShardFeed
    from ..runtime.pipeline import process_shards
    from ..sink.output import OutputDir
    from ..sink.parts import ParquetSink
    from ..sources import discover_shards
    from .profiling import device_profile, host_profile

    def force(key: str, q: int) -> int:
        return stop_after(key_index(key) * n_questions + q)

    def one(run_spec: JobSpec, paths: list[Path]):
        out = OutputDir(run_spec.output.path)
        out.prepare()
        try:
            feed = ShardFeed(discover_shards([str(p) for p in paths], run_spec.data.shard_size))
            sink = ParquetSink(out, {"bench": True})
            return process_shards(run_spec, worker.resolved.path, worker.engine, sink, feed, worker.decode, force_eos=force)
        finally:
            out.lock.release()

    if hasattr(worker.engine, "stop_schedule"):
        worker.engine.stop_schedule = True  # the profile's stop schedule, captured in the decode step
    warm_spec = replace(spec, output=replace(spec.output, path=spec.output.path + "-warmup"))
    one(warm_spec, warm_shards)  # allocates the KV slots and captures the CUDA graph
    kept = worker.engine.stats
    worker.engine.stats = type(kept)(slots=kept.slots, common_tokens=kept.common_tokens)
    clock = attach_clock(worker.engine)
    _reset_peak()
    label = f"{spec.prompt.task}, weights {spec.model.quantize}, KV {spec.model.kv_dtype}"
    with device_profile(profiles[1], label) as kernels, host_profile(profiles[0], label):
        started = time.perf_counter()
        stats = one(spec, shards)
        _sync()
        seconds = time.perf_counter() - started
        kernels["images"] = stats.images
    device = clock.seconds() if clock is not None else {}
    if clock is not None:
        worker.engine.device_clock = None
    return {"seconds": seconds, "stats": stats, "peak_gib": _peak_gib(), "device": device, "kernels": kernels}


@dataclass
class ProfileResult:
    profile: str
    requests: int
    answers: int
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def bench_profile(cfg: BenchConfig, task: str, worker, shards, warm_shards, work_dir: Path) -> ProfileResult:
    from ..preprocess.images import views_from_image_processor

    n_q = len(VQA_QUESTIONS) if task == "vqa" else 1
    spec = _spec(cfg, task, shards, work_dir / f"out-{task}", worker.resolved.path, str(worker.device))
    samples, decode_seconds = _prepare_in_memory(spec, worker.resolved.path, shards)
    keep_out_of_forks(samples)  # the measured run's decoder forks do not copy them (a job holds no decoded images)
    items = _work_items(samples, n_q)
    flops = FlopModel.of(worker.model)
    peak_tflops, _ = measured_peak()
    result = ProfileResult(task, len(samples), sum(len(i.prompts) for i in items))
    result.notes.append(
        f"preprocess (decode+resize+tokenize, fast decode) on one core: {len(samples) / decode_seconds:.1f} img/s"
    )
    prompt_tokens = len(items[0].prompts[0].input_ids)
    result.notes.append(f"prompt tokens: {prompt_tokens} ({prompt_tokens - 576} text + 576 image)")
    useful_flops = sum(
        flops.request_flops(len(p.input_ids), stop_after(key_index(s.key) * n_q + p.index), 1, share_image=p.index > 0)
        for s, item in zip(samples, items, strict=True) for p in item.prompts
    )

    mean_answer = round(sum(stop_after(key_index(s.key) * n_q + q) for s in samples for q in range(n_q)) / result.answers)
    prefill_flops = flops.vision_per_image + flops.request_flops(prompt_tokens, 0, 0) - flops.lm_head_per_token
    reference = None
    from .variants import variant_name, variants

    bf16_model = worker.model
    for quantize, kv_dtype in variants(cfg.quantize, cfg.kv_dtypes, cfg.paired):
        name, label = variant_name(quantize, kv_dtype)
        run_spec = _spec(cfg, task, shards, work_dir / f"out-{task}-{name}", worker.resolved.path, str(worker.device),
                         kv_dtype, quantize)
        if (quantize, kv_dtype) != ("none", "auto"):
            from ..runtime.worker import build_engine
            from .variants import weights_for

            worker.model = weights_for(bf16_model, worker.model, quantize)
            worker.engine = build_engine(run_spec, worker.model, worker.processor, worker.device)
        dvl = run_dvl(run_spec, worker, shards, warm_shards, n_q, (cfg.host_profile, cfg.device_profile))
        split = decode_split(worker.engine, prompt_tokens, mean_answer)
        if hasattr(worker.engine, "close"):
            worker.engine.close()  # give the KV slots back before the next engine allocates its own
        answers = read_answers(Path(run_spec.output.path))
        entry = slot_engine_entry(label, dvl, answers, len(samples), split, useful_flops, prefill_flops, peak_tflops)
        if entry.get("profiled"):
            result.notes.append(f"{label}: traced by --device-profile (its rate includes the tracing; kernels in "
                                f"{cfg.device_profile})")
        if reference is None:
            reference = (name, entry, answers)
        else:
            entry["ratio_vs_" + reference[0]] = round(reference[1]["seconds"] / entry["seconds"], 3)
            result.notes.append(compare_answers(label, answers, reference[2], reference[1]["engine"]))
        result.engines[name] = entry
    if worker.model is not bf16_model:  # generate runs on the bf16 weights, without the copy beside them
        worker.engine, worker.model = None, bf16_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dvl_answers = reference[2]  # the first run's answers are the ones compared with generate

    if not cfg.skip_hf and task == "caption":
        views = views_from_image_processor(worker.processor.image_processor)
        best = None
        for bs in cfg.hf_batch_sizes:
            hf = run_generate(worker.model, worker.processor, views, items, cfg, bs)
            hf_tokens = sum(len(c.tokens) for c in hf["completions"].values())
            summary = summarise(f"transformers generate ({cfg.hf_cache} cache, bs {bs})", hf["seconds"], len(samples),
                                 len(hf["completions"]), hf_tokens, useful_flops, hf["peak_gib"], peak_tflops)
            result.engines[f"hf_bs{bs}"] = summary
            if best is None or hf["seconds"] < best[0]["seconds"]:
                best = (hf, summary)
        hf, summary = best
        for engine_entry in (e for n, e in result.engines.items() if n.startswith("dvl")):
            engine_entry["ratio_vs_best_generate"] = round(summary["seconds"] / engine_entry["seconds"], 3)
        if cfg.check_outputs:
            result.notes.append(compare_with_generate(hf["completions"], dvl_answers, samples, worker.decode))
    return result


def run_bench(cfg: BenchConfig, cache_dir: Path) -> dict[str, Any]:
    import transformers

    from ..engine.model import ResolvedModel, pick_device, pick_dtype
    from ..runtime.worker import DeviceWorker

    device = pick_device(cfg.device)
    if cfg.device_profile and device.type != "cuda":
        raise UsageError("--device-profile traces GPU kernels and needs a CUDA device; use --host-profile on CPU")
    dtype = pick_dtype("auto", device)
    work = Path(tempfile.mkdtemp(prefix="dvl-bench-"))
    data = Path(cfg.data_dir) if cfg.data_dir else work / "data"
    cpu = os.cpu_count() or 1
    shards = make_jpeg_shards(data / "main", cfg.requests, cfg.images_per_shard, cfg.image_side, cpu)
    warm = make_jpeg_shards(data / "warm", min(cfg.images_per_shard, 64), 64, cfg.image_side, cpu)
    if device.type == "cuda":
        from ..runtime.worker import prepare_cuda_process

        prepare_cuda_process(device)
    model, processor, path = build_model(cfg.shape, device, dtype, cache_dir)
    resolved = ResolvedModel(path, f"random {cfg.shape}", tiny=cfg.shape == "tiny")
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak": measured_peak()[1],
        "profiles": {},
    }
    tasks = ["caption", "vqa"] if cfg.profile == "both" else [cfg.profile.replace("caption-varlen", "caption")]
    for task in tasks:
        spec = _spec(cfg, task, shards, work / "unused", path, str(device))
        worker = DeviceWorker.from_loaded(spec, resolved, model, processor)
        outcome = bench_profile(cfg, task, worker, shards, warm, work)
        results["profiles"][task] = asdict(outcome)
        Path(cfg.out).write_text(json.dumps(results, indent=2, default=str))  # a cut-short run keeps its profiles
        if task != tasks[-1]:  # so does its log; the last table is the command's own output (printed once)
            print(f"profile {task} done:\n{format_table(results)}", file=sys.stderr, flush=True)
    if "caption" in results["profiles"] and "vqa" in results["profiles"]:
        caption, vqa = (results["profiles"][task]["engines"] for task in ("caption", "vqa"))
        for name in (n for n in vqa if n.startswith("dvl") and n in caption):
            ratio = round(vqa[name]["answers_per_s"] / caption[name]["images_per_s"], 3)
            key = "vqa_answers_per_s_over_caption_images_per_s" if name == "dvl" else f"vqa_over_caption_{name}"
            results[key] = ratio
    Path(cfg.out).write_text(json.dumps(results, indent=2, default=str))
    return results


def run_preprocess_bench(cfg: BenchConfig, cache_dir: Path) -> dict[str, Any]:
    """Decode + resize + pad + tokenize rate of one core on the profile's ~1024px JPEGs.

    This is what one decoder process does per sample (`SamplePreparer.prepare`), measured in
    this process with torch limited to one thread, for the fast (JPEG draft) and the exact
    (the checkpoint's processor on a full decode) paths. The processor is the tiny model's,
    which is the real checkpoint's image processor and chat template.
    """
    from ..tiny import ensure_tiny_model

    if cfg.device_profile or cfg.host_profile:
        raise UsageError("--device-profile and --host-profile trace the engine runs; the preprocess profile has none")
    work = Path(tempfile.mkdtemp(prefix="dvl-bench-"))
    data = Path(cfg.data_dir) if cfg.data_dir else work / "data"
    count = min(cfg.requests, 512)
    shards = make_jpeg_shards(data / "preprocess", count, cfg.images_per_shard, cfg.image_side, os.cpu_count() or 1)
    model_path = str(ensure_tiny_model(cache_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for fast in (True, False):
            spec = _spec(cfg, "caption", shards, work / "unused", model_path, "cpu")
            spec = replace(spec, data=replace(spec.data, fast_decode=fast))
            _prepare_in_memory(spec, model_path, shards[:1])  # warm: imports, the OS file cache
            samples, seconds = _prepare_in_memory(spec, model_path, shards)
            errors = sum(s.error is not None for s in samples)
            rows.append({"path": "fast (draft decode)" if fast else "exact (processor)", "images": len(samples),
                         "seconds": round(seconds, 3), "images_per_s_per_core": round(len(samples) / seconds, 1),
                         "errors": errors})
    finally:
        torch.set_num_threads(threads)
    results = {"config": asdict(cfg), "device": platform.processor() or "cpu", "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "preprocess": rows}
    Path(cfg.out).write_text(json.dumps(results, indent=2, default=str))
    return results


