"""`dvl-batch bench`: the benchmark command (its options and checks; the work is in `bench/`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from .cli_options import (
    BatchSize,
    BenchDataDir,
    BenchFuseProjections,
    BenchHfBatchSizes,
    BenchKvDtypes,
    BenchPaired,
    BenchQuantize,
    BenchVisionEpilogue,
    Device,
    DeviceProfile,
    HostProfile,
    PrefillBatch,
    Workers,
)
from .errors import UsageError

err = Console(stderr=True, soft_wrap=True)  # one-line messages stay one line in logs


def bench(
    profile: Annotated[str, typer.Option(
        help="caption-varlen, vqa (5 questions per image), both, or preprocess (CPU decode rate per core, no model).",
    )] = "caption-varlen",
    shape: Annotated[str, typer.Option(help="real-1.3b (random weights of the checkpoint's shape) or tiny.")] = "real-1.3b",
    requests: Annotated[int, typer.Option(help="Images in the run (>= 2048 for the reference numbers).")] = 2048,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length cap; the stop schedule ends most answers earlier.")] = 128,
    hf_batch_size: BenchHfBatchSizes = None,
    hf_cache: Annotated[str, typer.Option(help="static (compiled decode) or dynamic cache for the generate baseline.")] = "static",
    skip_hf: Annotated[bool, typer.Option("--skip-hf", help="Only run dvl-batch.")] = False,
    batch_size: BatchSize = None,
    prefill_batch: PrefillBatch = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs")] = True,
    compile: Annotated[bool, typer.Option("--compile/--no-compile")] = True,
    compile_decode: Annotated[bool, typer.Option("--compile-decode/--no-compile-decode")] = True,
    triton_attention: Annotated[bool, typer.Option("--triton-attention/--no-triton-attention")] = True,
    overlap_prefill: Annotated[bool, typer.Option("--overlap-prefill/--no-overlap-prefill")] = True,
    fuse_projections: BenchFuseProjections = True,
    vision_epilogue: BenchVisionEpilogue = True,
    kv_dtype: BenchKvDtypes = None,
    quantize: BenchQuantize = None,
    paired: BenchPaired = False,
    workers: Workers = None,
    images_per_shard: Annotated[int, typer.Option(help="Images per generated webdataset shard.")] = 256,
    image_side: Annotated[int, typer.Option(help="Long side of the generated JPEGs.")] = 1024,
    data_dir: BenchDataDir = None,
    device: Device = None,
    out: Annotated[str, typer.Option("--out", help="JSON results file.")] = "bench.json",
    host_profile: HostProfile = None,
    device_profile: DeviceProfile = None,
) -> None:
    """Benchmark dvl-batch end to end against transformers' generate on the same inputs (prints a table, writes JSON)."""
    from .bench import BenchConfig, format_preprocess_table, format_table, run_bench, run_preprocess_bench
    from .config.launch import default_cache_dir
    from .runtime.worker import quiet_transformers

    quiet_transformers()
    cfg = BenchConfig(
        profile=profile, shape=shape, requests=requests, max_new_tokens=max_new_tokens,
        hf_batch_sizes=tuple(hf_batch_size or [256]), hf_cache=hf_cache, skip_hf=skip_hf, batch_size=batch_size,
        prefill_batch=prefill_batch, workers=workers, images_per_shard=images_per_shard, image_side=image_side,
        data_dir=data_dir, device=device or "auto", cuda_graphs=cuda_graphs, compile=compile,
        compile_decode=compile_decode, triton_attention=triton_attention, overlap_prefill=overlap_prefill, kv_dtypes=tuple(kv_dtype or ["auto"]),
        fuse_projections=fuse_projections, vision_epilogue=vision_epilogue,
        quantize=tuple(quantize or ["none"]), paired=paired, host_profile=host_profile, device_profile=device_profile, out=out,
    )
    from .bench.variants import check_variant_options

    check_variant_options(cfg.quantize, cfg.kv_dtypes, cfg.paired)
    if profile != "preprocess":
        from .engine.model import check_kv_dtype, pick_device, pick_dtype
        from .engine.quantize import check_engine_quantize, check_quantize

        device = pick_device(cfg.device)
        for kv_dtype in cfg.kv_dtypes:  # before any shard is written or model built
            check_kv_dtype(kv_dtype, device)
        for mode in cfg.quantize:
            check_quantize(mode, device, pick_dtype("auto", device))
            check_engine_quantize(mode, "continuous", device)
    if profile not in ("caption-varlen", "vqa", "both", "preprocess") or shape not in ("real-1.3b", "tiny"):
        raise UsageError("--profile must be caption-varlen, vqa, both or preprocess; --shape real-1.3b or tiny")
    if profile == "preprocess":
        print(format_preprocess_table(run_preprocess_bench(cfg, default_cache_dir())))
    else:
        print(format_table(run_bench(cfg, default_cache_dir())))
    err.print(f"results written to {out}")
