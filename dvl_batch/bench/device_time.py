"""Device time per phase for the bench: CUDA-event totals from the engine, and the split of
a decode step between attention and the rest (torch.profiler over one eager step).

The engine's event clock (engine/device_clock.py) gives vision, prefix prefill, suffix
prefill (with the first-token pick) and decode totals. A CUDA-graph replay cannot be
divided by events, so the attention share of decode is measured once after the run on
the run's own layout, with every slot mid-answer (the average context of the profile),
and applied to the decode total; its achieved bandwidth is the keys/values it must read
over its kernel time.
"""

from __future__ import annotations

from typing import Any

import torch

ATTENTION_KERNELS = ("_decode_kernel", "_combine_kernel")


def attach_clock(engine):
    """Give a slot engine a fresh device clock (None for engines without one, or on CPU)."""
    from ..engine.device_clock import DeviceClock

    if not hasattr(engine, "device_clock") or engine.device.type != "cuda":
        return None
    engine.device_clock = DeviceClock(engine.device)
    return engine.device_clock


def median_device_seconds(fn, repeats: int = 5, warmups: int = 1, on_cuda: bool = True) -> float:
    """Median device seconds of fn() after `warmups` calls (CUDA events around each call):
    what the benchmark scripts time their pieces with. `on_cuda=False` (a CPU check of a
    script, no GPU): wall seconds of each call instead."""
    import time

    for _ in range(warmups):
        fn()
    if on_cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if not on_cuda:
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1000)
    return sorted(samples)[len(samples) // 2]


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy rate, bytes read + written per second (the practical ceiling)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() / (start.elapsed_time(end) / 1000)


@torch.inference_mode()
def decode_split(engine, prompt_tokens: int, mean_answer: int) -> dict[str, Any] | None:
    """Attention's share of one decode step on the engine's layout, and its bandwidth."""
    from torch.profiler import ProfilerActivity, profile

    store = getattr(engine, "store", None)
    if store is None or not store.on_cuda:
        return None
    layout, vlm = store.layout, store.vlm
    width = store.kv.prefix_k.shape[3]  # the common head's positions and the layout's own prefix capacity
    store.group_prefix.fill_(min(prompt_tokens, width))
    store.row_prefix.fill_(prompt_tokens)
    store.row_len.fill_(mean_answer // 2)
    store.decoder.body_all()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        store.decoder.body_all()
        torch.cuda.synchronize()
    total = attention = 0.0
    for event in prof.key_averages():
        spent = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        total += spent
        if any(name in event.key for name in ATTENTION_KERNELS):
            attention += spent
    store.reset_rows()
    if not total or not attention:
        return None
    element = store.kv_dtype.itemsize  # an fp8 cache moves half the bytes
    per_position = 2 * vlm.num_layers * vlm.num_kv_heads * vlm.head_dim * element
    positions = layout.groups * min(prompt_tokens, width) + layout.rows * (mean_answer // 2 + 1)
    seconds = attention / 1e6
    return {
        "attention_fraction": attention / total,
        "attention_TBps": per_position * positions / seconds / 1e12,
        "copy_TBps": copy_bandwidth() / 1e12,
        "step_ms_eager": total / 1000,
    }


def per_image(device: dict[str, float], split: dict | None, wall: float, images: int) -> dict[str, float]:
    """Milliseconds of device time per image for each phase, and the idle rest of the wall time.
    With the prefill overlapped (engine/overlap.py) the phases' intervals overlap: each is its
    stream's time, contention included, their sum ("busy") can pass the wall time, and "idle"
    is then a lower bound; "wall" is the run's wall time per image either way."""
    ms = {name: round(seconds / images * 1000, 3) for name, seconds in device.items()}
    busy = sum(device.values())
    ms["busy"] = round(busy / images * 1000, 3)
    ms["idle"] = round(max(0.0, wall - busy) / images * 1000, 3)
    ms["wall"] = round(wall / images * 1000, 3)
    if split and "decode" in ms:
        ms["decode_attention"] = round(ms["decode"] * split["attention_fraction"], 3)
        ms["decode_rest"] = round(ms["decode"] - ms["decode_attention"], 3)
    return ms
