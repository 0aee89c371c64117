"""Optional profilers around the bench's measured dvl-batch run: host (cProfile) and device.

The device profile answers what the bench's per-phase event clock cannot: which kernels
the GPU spent a real run on (not an isolated phase on synthetic inputs), and where it
sat idle between them. It is a torch.profiler trace of CUDA activity only; kernels
replayed from CUDA graphs are included. The report groups kernel time by kind, lists
the top kernels, and sums the gaps between consecutive kernels by size, naming the
kernels that most often precede a long gap (what the device waited behind).
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

# kernel-name fragments -> kind (first match wins; order matters)
KINDS = (
    ("attention (decode)", ("_decode_kernel", "_combine_kernel", "_shared_prefix_kernel", "_suffix_tokens_kernel")),
    ("attention (prefill)", ("sdpa", "flash", "fmha", "attention")),
    ("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas", "matmul", "_scaled_mm")),
    ("norm", ("norm", "rsqrt")),
    ("activation", ("silu", "gelu")),
    ("copy/index", ("index", "gather", "scatter", "copy", "Memcpy", "cat", "nchwToNhwc", "nhwcToNchw")),
    ("reduce/sample", ("argmax", "reduce", "max", "sort", "topk")),
    ("fill", ("fill", "Memset", "zero")),
)
GAP_BINS_US = (10, 100, 1000, 10_000)


def kind_of(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("triton_"):  # inductor's fusions: their casts say nothing of what they do
        lowered = lowered.replace("_to_copy", "")
    for kind, fragments in KINDS:
        if any(f.lower() in lowered for f in fragments):
            return kind
    return "other element-wise"


@contextlib.contextmanager
def host_profile(path: str | None, label: str) -> Iterator[None]:
    """cProfile of the host side, appended to `path` (tottime and cumulative views)."""
    if not path:
        yield
        return
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        with open(path, "a") as handle:
            handle.write(f"=== host profile: {label}\n")
            view = pstats.Stats(profiler, stream=handle)
            view.sort_stats("tottime").print_stats(30)
            view.sort_stats("cumulative").print_stats(40)


@contextlib.contextmanager
def device_profile(path: str | None, label: str) -> Iterator[dict[str, Any]]:
    """torch.profiler over the block (CUDA activity); writes the report to `path` and fills
    the yielded dict with its summary (for the bench's JSON). The block sets "images" in
    the dict (the report is per image)."""
    summary: dict[str, Any] = {}
    if not path:
        yield summary
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield summary
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if _on_device(e)]
    summary.update(summarise_kernels(kernels, summary.get("images", 1)))
    with open(path, "a") as handle:
        handle.write(f"=== device profile: {label}\n{format_summary(summary)}\n")
        handle.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
        handle.write("\n")


def _on_device(event) -> bool:
    kind = getattr(event, "device_type", None)
    return kind is not None and str(kind).endswith("CUDA") and event.time_range.end > event.time_range.start


def summarise_kernels(kernels: list[tuple[str, float, float]], images: int) -> dict[str, Any]:
    """Busy time by kind, the span, and the idle gaps between kernels (times in microseconds,
    as the profiler records them; reported in ms per image)."""
    if not kernels:
        return {}
    kernels = sorted(kernels, key=lambda k: k[1])
    by_kind: dict[str, float] = defaultdict(float)
    gaps = [0.0] * (len(GAP_BINS_US) + 1)
    before_long_gaps: Counter[str] = Counter()
    reach, last_name = kernels[0][2], kernels[0][0]
    for name, start, end in kernels:
        by_kind[kind_of(name)] += end - start
        if start > reach:
            gap = start - reach
            gaps[sum(gap >= b for b in GAP_BINS_US)] += gap
            if gap >= GAP_BINS_US[1]:
                before_long_gaps[last_name] += 1
        if end > reach:
            reach, last_name = end, name
    span = reach - kernels[0][1]
    per_image = 1000.0 * max(images, 1)  # us -> ms per image
    labels = [f"< {GAP_BINS_US[0]} us"] + [f"{lo}-{hi} us" for lo, hi in pairwise(GAP_BINS_US)]
    labels.append(f">= {GAP_BINS_US[-1]} us")
    return {
        "span_ms_per_image": round(span / per_image, 4),
        "kernel_ms_per_image": {k: round(v / per_image, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "gap_ms_per_image": {label: round(g / per_image, 4) for label, g in zip(labels, gaps, strict=True)},
        "before_long_gaps": before_long_gaps.most_common(8),
    }


def format_summary(summary: dict[str, Any]) -> str:
    if not summary:
        return "(no device kernels recorded)"
    lines = [f"span {summary['span_ms_per_image']:.3f} ms per image; kernel time by kind (ms per image):"]
    lines += [f"  {kind:<24} {ms:8.3f}" for kind, ms in summary["kernel_ms_per_image"].items()]
    lines.append("idle gaps between kernels (ms per image):")
    lines += [f"  {label:<24} {ms:8.3f}" for label, ms in summary["gap_ms_per_image"].items()]
    lines.append("kernels most often followed by a gap >= 100 us:")
    lines += [f"  {count:6d}  {name[:90]}" for name, count in summary["before_long_gaps"]]
    return "\n".join(lines)
