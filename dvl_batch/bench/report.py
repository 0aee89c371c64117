"""The bench's tables: what a person reads at the end of `dvl-batch bench`."""

from __future__ import annotations

from typing import Any


def format_preprocess_table(results: dict[str, Any]) -> str:
    lines = [f"preprocess, one core, {results['config']['image_side']}px JPEGs (torch {results['torch']})",
             f"{'path':<22} {'images':>7} {'seconds':>8} {'img/s/core':>11} {'errors':>7}"]
    for row in results["preprocess"]:
        lines.append(f"{row['path']:<22} {row['images']:>7} {row['seconds']:>8.2f} {row['images_per_s_per_core']:>11.1f} "
                     f"{row['errors']:>7}")
    return "\n".join(lines)


def _number(value: Any, spec: str) -> str:
    """A measured value, or '-' where there is none (no GPU: no peak memory, no MFU)."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def format_table(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device']}  torch {results['torch']}  transformers {results['transformers']}",
             f"MFU relative to: {results['peak']}"]
    entries = [(name, entry) for name, profile in results["profiles"].items() for entry in profile["engines"].values()]
    width = max([len("engine"), *(len(str(entry["engine"])) for _, entry in entries)])
    profile_width = max([len("profile"), *(len(name) for name, _ in entries)])
    header = (f"{'profile':<{profile_width}} {'engine':<{width}} {'img/s':>8} {'ans/s':>8} {'tok/s':>9} "
              f"{'peak GiB':>9} {'MFU':>6} {'ratio':>6}")
    lines += [header, "-" * len(header)]
    for name, profile in results["profiles"].items():
        for entry in profile["engines"].values():
            ratio = entry.get("ratio_vs_best_generate")
            lines.append(
                f"{name:<{profile_width}} {entry['engine']:<{width}} {_number(entry.get('images_per_s'), '.2f'):>8} "
                f"{_number(entry.get('answers_per_s'), '.2f'):>8} {_number(entry.get('useful_tokens_per_s'), '.1f'):>9} "
                f"{_number(entry.get('peak_gpu_gib'), '.2f'):>9} {_number(entry.get('mfu'), '.3f'):>6} "
                f"{_number(ratio, '.2f') + 'x' if ratio is not None else '':>6}"
            )
        for key, dvl in profile["engines"].items():
            if not key.startswith("dvl"):
                continue
            lines.append(
                f"          {key}: {dvl['slots']} slots, {dvl.get('common_tokens', 0)} prompt tokens shared by all "
                f"rows, {dvl['decode_steps']} decode steps; host (not device) time in "
                f"admissions {dvl['prefill_seconds']} s, in decode launch+collect {dvl['decode_seconds']} s; "
                f"engine waiting for input with nothing to run {dvl['idle_seconds']} s (the first sample "
                f"arrived after {dvl.get('first_sample_seconds', 0.0)} s)"
            )
            if "device_ms_per_image" in dvl:
                lines.append(f"          {device_line(dvl)}")
            if "ratio_vs_dvl" in dvl:
                lines.append(f"          {key}: {dvl['ratio_vs_dvl']:.2f}x the slot engine with a model-dtype KV cache")
        lines += [f"          {note}" for note in profile["notes"]]
    if "vqa_answers_per_s_over_caption_images_per_s" in results:
        lines.append(f"VQA answers/s over caption images/s: {results['vqa_answers_per_s_over_caption_images_per_s']:.2f}x")
    for key, value in results.items():
        if key.startswith("vqa_over_caption_"):
            lines.append(f"VQA answers/s over caption images/s, {key.removeprefix('vqa_over_caption_')}: {value:.2f}x")
    return "\n".join(lines)


def device_line(dvl: dict[str, Any]) -> str:
    """Device milliseconds per image by phase (CUDA events), decode attention's bandwidth, prefill MFU."""
    ms = dvl["device_ms_per_image"]
    parts = [f"{name} {ms[name]:.2f}" for name in ("vision", "prefix", "suffix", "decode") if name in ms]
    text = "device ms/image: " + ", ".join(parts)
    split = dvl.get("decode_attention")
    if split and "decode_attention" in ms:
        text += (f" (attention {ms['decode_attention']:.2f} at {split['attention_TBps']:.2f} TB/s, copy "
                 f"{split['copy_TBps']:.2f}; rest {ms['decode_rest']:.2f})")
    if dvl.get("overlapped_prefills"):
        # Each phase's time then includes the other stream's kernels it waited behind: neither
        # their sum nor an MFU from them is a per-image cost.
        return text + (f"; {dvl['overlapped_prefills']} of {dvl.get('prefill_calls', '?')} prefills ran beside decode, "
                       f"so each phase's time includes waiting for the other's kernels (their sum {ms['busy']:.2f}, "
                       f"wall {ms.get('wall', 0.0):.2f}); per-phase costs: --no-overlap-prefill")
    text += f"; busy {ms['busy']:.2f}, idle {ms['idle']:.2f}"
    vision_prefix = ms.get("vision", 0.0) + ms.get("prefix", 0.0)
    text += f"; vision+prefix {vision_prefix:.2f}"
    if dvl.get("prefill_mfu") is not None:
        text += f" at {dvl['prefill_mfu']:.0%} MFU"
    return text


def error_text(exc: BaseException) -> str:
    """A failed benchmark row's `error`: the exception's type and the first line of its message
    (cut to 200 characters), or the type alone."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
