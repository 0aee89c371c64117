"""What one engine's run of a bench profile reports: its summary row, its answers, and
how they compare with another engine's answers to the same requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .device_time import per_image


def summarise(name, seconds, images, answers, tokens, flops, peak_gib, peak_tflops) -> dict[str, Any]:
    return {
        "engine": name,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2),
        "answers_per_s": round(answers / seconds, 2),
        "useful_tokens_per_s": round(tokens / seconds, 1),
        "peak_gpu_gib": round(peak_gib, 2),
        "mfu": round(flops / seconds / (peak_tflops * 1e12), 4) if peak_tflops == peak_tflops else None,
    }


def read_answers(out: Path) -> dict[tuple[str, int], tuple[str, int]]:
    """(key, question index) -> (answer text, generated tokens) from a run's parquet parts."""
    import pyarrow.parquet as pq

    answers = {}
    for part in sorted((out / "parts").glob("*.parquet")):
        for row in pq.read_table(part, columns=["key", "question_index", "answer", "generated_tokens"]).to_pylist():
            answers[(row["key"], row["question_index"])] = (row["answer"], row["generated_tokens"])
    return answers


def slot_engine_entry(name: str, dvl: dict[str, Any], answers: dict, images: int, split, useful_flops: float,
                      prefill_flops: float, peak_tflops: float) -> dict[str, Any]:
    """The summary row of a dvl-batch run, with host phase times and device time per phase."""
    tokens = sum(n for _, n in answers.values())
    entry = summarise(name, dvl["seconds"], images, len(answers), tokens, useful_flops, dvl["peak_gib"], peak_tflops)
    engine_stats = dvl["stats"].engine
    entry.update(
        idle_seconds=round(engine_stats.get("idle_seconds", 0.0), 3),
        first_sample_seconds=round(dvl["stats"].first_sample_seconds, 3),
        prefill_seconds=round(engine_stats.get("prefill_seconds", 0.0), 3),
        vision_seconds=round(engine_stats.get("vision_seconds", 0.0), 3),
        prefix_seconds=round(engine_stats.get("prefix_seconds", 0.0), 3),
        decode_seconds=round(engine_stats.get("decode_seconds", 0.0), 3),
        decode_steps=int(engine_stats.get("decode_steps", 0)),
        slots=int(engine_stats.get("slots", 0)),
        common_tokens=int(engine_stats.get("common_tokens", 0)),
        prefill_calls=int(engine_stats.get("prefill_calls", 0)),
        overlapped_prefills=int(engine_stats.get("overlapped_prefills", 0)),
    )
    if dvl["device"]:
        device_ms = per_image(dvl["device"], split, dvl["seconds"], images)
        entry["device_ms_per_image"] = device_ms
        entry["decode_attention"] = split
        prefill_ms = device_ms.get("vision", 0.0) + device_ms.get("prefix", 0.0)
        if prefill_ms and peak_tflops == peak_tflops:
            entry["prefill_mfu"] = round(prefill_flops / (prefill_ms / 1000) / (peak_tflops * 1e12), 3)
    if len(dvl.get("kernels", {})) > 1:  # the device profile's summary (beyond its image count)
        entry["device_profile"] = dvl["kernels"]
        entry["profiled"] = True  # traced: its rate includes the profiler's overhead
    return entry


def compare_with_generate(hf_completions, dvl_answers, samples, decode) -> str:
    """Same requests, same greedy decoding: how many answers are identical."""
    same = same_len = total = 0
    for uid, sample in enumerate(samples):
        for q in range(len(sample.requests)):
            completion = hf_completions.get((uid, q))
            theirs = dvl_answers.get((sample.key, q))
            if completion is None or theirs is None:
                continue
            total += 1
            same += decode(completion.tokens) == theirs[0]
            same_len += len(completion.tokens) == theirs[1]
    return f"outputs identical to generate: {same}/{total} answers ({same_len}/{total} with equal length)"


def compare_answers(label: str, answers: dict, reference: dict, reference_label: str) -> str:
    """Agreement of two dvl-batch runs over the same requests (e.g. fp8 vs bf16 KV)."""
    keys = [k for k in reference if k in answers]
    same = sum(answers[k][0] == reference[k][0] for k in keys)
    same_len = sum(answers[k][1] == reference[k][1] for k in keys)
    return (f"{label} answers identical to {reference_label}: {same}/{len(keys)} "
            f"({same_len}/{len(keys)} with equal length; random weights, check quality on the real checkpoint)")
