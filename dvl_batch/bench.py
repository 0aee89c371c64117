"""`dvl-batch bench`: dvl-batch end to end vs transformers' generate, side by side, one process.

Profile caption-varlen (the team's reference workload): random weights of the real
deepseek-vl-1.3b-chat shape, ~1024px JPEGs in webdataset shards on disk, one prompt
of ~616 tokens (576 image tokens), max_new_tokens 128, and request i forced to stop
after L_i = 16 + (i*37 % 113) tokens by a logits processor emitting EOS (the same rule
in both engines). Random weights never choose EOS by themselves, so the schedule is
what gives answers their realistic spread of lengths.

Both engines see identical inputs (the same preprocessed pixels and token ids). The
generate baseline gets them pre-decoded in memory; dvl-batch reads and decodes the
shards itself while it runs, and writes parquet parts. The table reports images/s,
useful tokens/s, peak GPU memory, MFU and the ratio; results go to a JSON file.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config.spec import BatchSpec, DataSpec, GenerationSpec, JobSpec, ModelSpec, OutputSpec, PromptSpec

VQA_QUESTIONS = (
    "What is the main subject of this image?",
    "What colours dominate the picture?",
    "Is this photo taken indoors or outdoors?",
    "How many people are visible?",
    "What is happening in the background?",
)
# A system prompt that makes the tiny tokenizer's caption prompt 616 tokens, like the real one's.
BENCH_SYSTEM_PROMPT = "You are a helpful language and vision assistant. Describe what you see in the image here."
MEASURED_BF16_PEAK_TFLOPS = {"H100": 795.0, "H200": 790.0}  # 8192^3 bf16 matmul on the lent machines


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
    triton_attention: bool = True
    check_outputs: bool = True
    host_profile: str | None = None  # write a cProfile of the dvl-batch runs' host side here
    out: str = "bench.json"


def stop_after(index: int) -> int:
    """The profile's stop schedule: request i ends with EOS as token number 16 + (i*37 % 113)."""
    return 16 + (index * 37) % 113


def _key_index(key: str) -> int:
    return int(key.rsplit("-", 1)[-1])


# ------------------------------------------------------------------ data


def _render_jpeg(args: tuple[int, int, list[bytes]]) -> tuple[str, bytes]:
    """A ~side-px JPEG: a crop of a real photo, resized and jittered so every image differs."""
    from PIL import Image, ImageEnhance

    index, side, sources = args
    base = Image.open(io.BytesIO(sources[index % len(sources)])).convert("RGB")
    w, h = base.size
    crop = 0.6 + 0.4 * ((index * 7919) % 97) / 96
    cw, ch = int(w * crop), int(h * crop)
    left, top = (index * 31) % max(1, w - cw + 1), (index * 17) % max(1, h - ch + 1)
    image = base.crop((left, top, left + cw, top + ch))
    aspect = image.width / image.height
    size = (side, max(1, int(side / aspect))) if aspect >= 1 else (max(1, int(side * aspect)), side)
    image = image.resize(size, Image.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(0.8 + 0.4 * ((index * 13) % 11) / 10)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return f"img-{index:07d}", buffer.getvalue()


def make_jpeg_shards(folder: Path, count: int, per_shard: int, side: int, workers: int) -> list[Path]:
    """Webdataset shards of `count` JPEGs (cached: reused when already complete)."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"complete-{count}-{per_shard}-{side}.json"
    n_shards = -(-count // per_shard)
    paths = [folder / f"bench-{s:06d}.tar" for s in range(n_shards)]
    if marker.exists():
        return paths
    sources = [p.read_bytes() for p in sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.jpg"))]
    if not sources:
        raise RuntimeError("benchmark needs examples/images/*.jpg")
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        rendered = list(pool.map(_render_jpeg, [(i, side, sources) for i in range(count)], chunksize=16))
    for s, path in enumerate(paths):
        with tarfile.open(path, "w") as archive:
            for key, data in rendered[s * per_shard : (s + 1) * per_shard]:
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    marker.write_text(json.dumps({"count": count}))
    return paths


# ------------------------------------------------------------------ model


def _real_config(image_token_id: int, vocab: int, bos: int, eos: int):
    from transformers import DeepseekVLConfig

    return DeepseekVLConfig(
        text_config=dict(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=vocab, max_position_embeddings=16384, rms_norm_eps=1e-6,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=384, patch_size=16,
        ),
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


def build_model(shape: str, device: torch.device, dtype: torch.dtype, cache_dir: Path):
    """Random weights of the chosen shape with the tiny model's tokenizer and processor.

    Returns (model, processor, processor_dir); the pipeline's workers load the
    processor from processor_dir.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .tiny import ensure_tiny_model

    tiny = ensure_tiny_model(cache_dir)
    processor = AutoProcessor.from_pretrained(tiny)
    if shape == "tiny":
        model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=dtype).to(device).eval()
        return model, processor, str(tiny)
    tok = processor.tokenizer
    config = _real_config(processor.image_token_id, 102400, tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    return model.eval(), processor, str(tiny)


# ------------------------------------------------------------------ accounting


@dataclass
class FlopModel:
    """FLOPs of the useful work, from the model's shapes (2 per multiply-add)."""

    vision_per_image: float
    llm_per_token: float  # all linear layers of the language model
    lm_head_per_token: float
    attn_per_token_per_ctx: float  # QK^T and PV per token per attended position
    params_bytes: float

    @classmethod
    def of(cls, model) -> FlopModel:
        t, v = model.config.text_config, model.config.vision_config
        h, f, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
        kv = (getattr(t, "num_key_value_heads", None) or t.num_attention_heads) * (h // t.num_attention_heads)
        llm = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * f)
        vh, vf, vl = v.hidden_size, v.intermediate_size, v.num_hidden_layers
        n = (v.image_size // v.patch_size) ** 2
        vision = 2 * vl * n * (4 * vh * vh + 2 * vh * vf) + 4 * vl * n * n * vh + 2 * n * (3 * v.patch_size**2 * vh)
        vision += 2 * n * (vh * h + h * h)  # aligner
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return cls(vision, llm, 2 * h * t.vocab_size, 4 * layers * h, params)

    def request_flops(self, prompt_tokens: int, generated: int, images: int, share_image: bool = False) -> float:
        prefill = prompt_tokens * self.llm_per_token + self.attn_per_token_per_ctx * prompt_tokens * prompt_tokens / 2
        decode = generated * (self.llm_per_token + self.lm_head_per_token)
        decode += self.attn_per_token_per_ctx * sum(prompt_tokens + t for t in range(generated))
        return (0 if share_image else images * self.vision_per_image) + prefill + decode + self.lm_head_per_token


def _peak_tflops() -> tuple[float, str]:
    if not torch.cuda.is_available():
        return float("nan"), "n/a (CPU)"
    name = torch.cuda.get_device_name()
    for key, value in MEASURED_BF16_PEAK_TFLOPS.items():
        if key in name:
            return value, f"{value:.0f} TFLOP/s measured bf16 matmul peak ({name})"
    return float("nan"), f"unknown peak ({name})"


# ------------------------------------------------------------------ runs


def _spec(cfg: BenchConfig, task: str, inputs: list[Path], out: Path, model_path: str, device: str) -> JobSpec:
    prompt = PromptSpec(task=task, system_prompt=BENCH_SYSTEM_PROMPT, questions=VQA_QUESTIONS if task == "vqa" else ())
    return JobSpec(
        model=ModelSpec(name=model_path, device=device),
        prompt=prompt,
        generation=GenerationSpec(max_new_tokens=cfg.max_new_tokens),
        data=DataSpec(inputs=tuple(str(p) for p in inputs), workers=cfg.workers),
        batch=BatchSpec(
            batch_size=cfg.batch_size, prefill_batch=cfg.prefill_batch, cuda_graphs=cfg.cuda_graphs, compile=cfg.compile,
            triton_attention=cfg.triton_attention,
        ),
        output=OutputSpec(path=str(out)),
    )


def _prepare_in_memory(spec: JobSpec, model_path: str, shards: list[Path]):
    """Decode every sample once (for the generate baseline and the per-core decode rate)."""
    from .preprocess.preparer import SamplePreparer
    from .records import ShardEnd
    from .sources import discover_shards, read_shard

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
    from .engine.types import EnginePrompt, WorkItem

    items = []
    for uid, sample in enumerate(samples):
        index = _key_index(sample.key)
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
    from .engine.generate import GenerateEngine
    from .runtime.worker import eos_ids

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
    spec: JobSpec, worker, shards: list[Path], warm_shards: list[Path], n_questions: int, host_profile: str | None = None
) -> dict[str, Any]:
    from .runtime.feed import ShardFeed
    from .runtime.pipeline import process_shards
    from .sink.output import OutputDir
    from .sink.parts import ParquetSink
    from .sources import discover_shards

    def force(key: str, q: int) -> int:
        return stop_after(_key_index(key) * n_questions + q)

    def one(run_spec: JobSpec, paths: list[Path]):
        out = OutputDir(run_spec.output.path)
        out.prepare()
        try:
            feed = ShardFeed(discover_shards([str(p) for p in paths], run_spec.data.shard_size))
            sink = ParquetSink(out, {"bench": True})
            return process_shards(run_spec, worker.resolved.path, worker.engine, sink, feed, worker.decode, force_eos=force)
        finally:
            out.lock.release()

    warm_spec = replace(spec, output=replace(spec.output, path=spec.output.path + "-warmup"))
    one(warm_spec, warm_shards)  # allocates the KV slots and captures the CUDA graph
    worker.engine.stats = type(worker.engine.stats)(slots=worker.engine.stats.slots)
    _reset_peak()
    profiler = None
    if host_profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    stats = one(spec, shards)
    _sync()
    seconds = time.perf_counter() - started
    if profiler is not None:
        import pstats

        profiler.disable()
        with open(host_profile, "a") as handle:
            handle.write(f"=== host profile: {spec.prompt.task}\n")
            stats_view = pstats.Stats(profiler, stream=handle)
            stats_view.sort_stats("tottime").print_stats(30)
            stats_view.sort_stats("cumulative").print_stats(40)
    return {"seconds": seconds, "stats": stats, "peak_gib": _peak_gib()}


def _read_answers(out: Path) -> dict[tuple[str, int], tuple[str, int]]:
    import pyarrow.parquet as pq

    answers = {}
    for part in sorted((out / "parts").glob("*.parquet")):
        for row in pq.read_table(part, columns=["key", "question_index", "answer", "generated_tokens"]).to_pylist():
            answers[(row["key"], row["question_index"])] = (row["answer"], row["generated_tokens"])
    return answers


@dataclass
class ProfileResult:
    profile: str
    requests: int
    answers: int
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _summarise(name, seconds, images, answers, tokens, flops, peak_gib, peak_tflops) -> dict[str, Any]:
    return {
        "engine": name,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2),
        "answers_per_s": round(answers / seconds, 2),
        "useful_tokens_per_s": round(tokens / seconds, 1),
        "peak_gpu_gib": round(peak_gib, 2),
        "mfu": round(flops / seconds / (peak_tflops * 1e12), 4) if peak_tflops == peak_tflops else None,
    }


def bench_profile(cfg: BenchConfig, task: str, worker, shards, warm_shards, work_dir: Path) -> ProfileResult:
    from .preprocess.images import views_from_image_processor

    n_q = len(VQA_QUESTIONS) if task == "vqa" else 1
    spec = _spec(cfg, task, shards, work_dir / f"out-{task}", worker.resolved.path, str(worker.device))
    samples, decode_seconds = _prepare_in_memory(spec, worker.resolved.path, shards)
    items = _work_items(samples, n_q)
    flops = FlopModel.of(worker.model)
    peak_tflops, _ = _peak_tflops()
    result = ProfileResult(task, len(samples), sum(len(i.prompts) for i in items))
    result.notes.append(
        f"preprocess (decode+resize+tokenize, fast decode) on one core: {len(samples) / decode_seconds:.1f} img/s"
    )
    prompt_tokens = len(items[0].prompts[0].input_ids)
    result.notes.append(f"prompt tokens: {prompt_tokens} ({prompt_tokens - 576} text + 576 image)")
    useful_flops = sum(
        flops.request_flops(len(p.input_ids), stop_after(_key_index(s.key) * n_q + p.index), 1, share_image=p.index > 0)
        for s, item in zip(samples, items, strict=True) for p in item.prompts
    )

    dvl = run_dvl(spec, worker, shards, warm_shards, n_q, cfg.host_profile)
    if hasattr(worker.engine, "close"):
        worker.engine.close()  # give the KV slots back before the baseline allocates its own
    dvl_answers = _read_answers(Path(spec.output.path))
    tokens = sum(n for _, n in dvl_answers.values())
    entry = _summarise("dvl-batch (end to end)", dvl["seconds"], len(samples), len(dvl_answers), tokens, useful_flops,
                       dvl["peak_gib"], peak_tflops)
    engine_stats = dvl["stats"].engine
    entry.update(
        idle_seconds=round(engine_stats.get("idle_seconds", 0.0), 3),
        prefill_seconds=round(engine_stats.get("prefill_seconds", 0.0), 3),
        vision_seconds=round(engine_stats.get("vision_seconds", 0.0), 3),
        prefix_seconds=round(engine_stats.get("prefix_seconds", 0.0), 3),
        decode_seconds=round(engine_stats.get("decode_seconds", 0.0), 3),
        decode_steps=int(engine_stats.get("decode_steps", 0)),
        slots=int(engine_stats.get("slots", 0)),
    )
    result.engines["dvl"] = entry

    if not cfg.skip_hf and task == "caption":
        views = views_from_image_processor(worker.processor.image_processor)
        best = None
        for bs in cfg.hf_batch_sizes:
            hf = run_generate(worker.model, worker.processor, views, items, cfg, bs)
            hf_tokens = sum(len(c.tokens) for c in hf["completions"].values())
            summary = _summarise(f"transformers generate ({cfg.hf_cache} cache, bs {bs})", hf["seconds"], len(samples),
                                 len(hf["completions"]), hf_tokens, useful_flops, hf["peak_gib"], peak_tflops)
            result.engines[f"hf_bs{bs}"] = summary
            if best is None or hf["seconds"] < best[0]["seconds"]:
                best = (hf, summary)
        hf, summary = best
        entry["ratio_vs_best_generate"] = round(summary["seconds"] / dvl["seconds"], 3)
        if cfg.check_outputs:
            result.notes.append(_compare(hf["completions"], dvl_answers, samples, worker))
    return result


def _compare(hf_completions, dvl_answers, samples, worker) -> str:
    """Same requests, same greedy decoding: how many answers are identical."""
    same = same_len = total = 0
    for uid, sample in enumerate(samples):
        for q in range(len(sample.requests)):
            completion = hf_completions.get((uid, q))
            theirs = dvl_answers.get((sample.key, q))
            if completion is None or theirs is None:
                continue
            total += 1
            same += worker.decode(completion.tokens) == theirs[0]
            same_len += len(completion.tokens) == theirs[1]
    return f"outputs identical to generate: {same}/{total} answers ({same_len}/{total} with equal length)"


def run_bench(cfg: BenchConfig, cache_dir: Path) -> dict[str, Any]:
    import transformers

    from .engine.model import ResolvedModel, pick_device, pick_dtype
    from .runtime.worker import DeviceWorker

    device = pick_device(cfg.device)
    dtype = pick_dtype("auto", device)
    work = Path(tempfile.mkdtemp(prefix="dvl-bench-"))
    data = Path(cfg.data_dir) if cfg.data_dir else work / "data"
    cpu = os.cpu_count() or 1
    shards = make_jpeg_shards(data / "main", cfg.requests, cfg.images_per_shard, cfg.image_side, cpu)
    warm = make_jpeg_shards(data / "warm", min(cfg.images_per_shard, 64), 64, cfg.image_side, cpu)
    if device.type == "cuda":
        from .runtime.worker import prepare_cuda_process

        prepare_cuda_process(device)
    model, processor, path = build_model(cfg.shape, device, dtype, cache_dir)
    resolved = ResolvedModel(path, f"random {cfg.shape}", tiny=cfg.shape == "tiny")
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak": _peak_tflops()[1],
        "profiles": {},
    }
    for task in ["caption", "vqa"] if cfg.profile == "both" else [cfg.profile.replace("caption-varlen", "caption")]:
        spec = _spec(cfg, task, shards, work / "unused", path, str(device))
        worker = DeviceWorker.from_loaded(spec, resolved, model, processor)
        outcome = bench_profile(cfg, task, worker, shards, warm, work)
        results["profiles"][task] = asdict(outcome)
    if "caption" in results["profiles"] and "vqa" in results["profiles"]:
        cap = results["profiles"]["caption"]["engines"]["dvl"]["images_per_s"]
        vqa = results["profiles"]["vqa"]["engines"]["dvl"]["answers_per_s"]
        results["vqa_answers_per_s_over_caption_images_per_s"] = round(vqa / cap, 3)
    Path(cfg.out).write_text(json.dumps(results, indent=2, default=str))
    return results


def run_preprocess_bench(cfg: BenchConfig, cache_dir: Path) -> dict[str, Any]:
    """Decode + resize + pad + tokenize rate of one core on the profile's ~1024px JPEGs.

    This is what one decoder process does per sample (`SamplePreparer.prepare`), measured in
    this process with torch limited to one thread, for the fast (JPEG draft) and the exact
    (the checkpoint's processor on a full decode) paths. The processor is the tiny model's,
    which is the real checkpoint's image processor and chat template.
    """
    from .tiny import ensure_tiny_model

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


def format_preprocess_table(results: dict[str, Any]) -> str:
    lines = [f"preprocess, one core, {results['config']['image_side']}px JPEGs (torch {results['torch']})",
             f"{'path':<22} {'images':>7} {'seconds':>8} {'img/s/core':>11} {'errors':>7}"]
    for row in results["preprocess"]:
        lines.append(f"{row['path']:<22} {row['images']:>7} {row['seconds']:>8.2f} {row['images_per_s_per_core']:>11.1f} "
                     f"{row['errors']:>7}")
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device']}  torch {results['torch']}  transformers {results['transformers']}",
             f"MFU relative to: {results['peak']}"]
    header = f"{'profile':<9} {'engine':<42} {'img/s':>8} {'ans/s':>8} {'tok/s':>9} {'peak GiB':>9} {'MFU':>6} {'ratio':>6}"
    lines += [header, "-" * len(header)]
    for name, profile in results["profiles"].items():
        for entry in profile["engines"].values():
            mfu = f"{entry['mfu']:.3f}" if entry.get("mfu") is not None else "-"
            ratio = f"{entry['ratio_vs_best_generate']:.2f}x" if "ratio_vs_best_generate" in entry else ""
            lines.append(
                f"{name:<9} {entry['engine']:<42} {entry['images_per_s']:>8.2f} {entry['answers_per_s']:>8.2f} "
                f"{entry['useful_tokens_per_s']:>9.1f} {entry['peak_gpu_gib']:>9.2f} {mfu:>6} {ratio:>6}"
            )
        dvl = profile["engines"]["dvl"]
        lines.append(
            f"          dvl: {dvl['slots']} slots, {dvl['decode_steps']} decode steps; host time in admissions "
            f"{dvl['prefill_seconds']} s, in decode launch+collect {dvl['decode_seconds']} s; "
            f"device idle waiting for data {dvl['idle_seconds']} s"
        )
        lines += [f"          {note}" for note in profile["notes"]]
    if "vqa_answers_per_s_over_caption_images_per_s" in results:
        lines.append(f"VQA answers/s over caption images/s: {results['vqa_answers_per_s_over_caption_images_per_s']:.2f}x")
    return "\n".join(lines)
