"""The README's performance figures are the ones in the bench result file it names.

Numbers in prose drift from the measurements they quote; this reads the file the
Performance section points at and checks every figure the section states about it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _performance_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Performance")
    return text[start : text.index("\n## ", start + 1)]


def _figure(section: str, pattern: str) -> float:
    match = re.search(pattern, section.replace("\n", " "))
    assert match, f"the Performance section no longer states {pattern!r}"
    return float(match.group(1))


def _named_results(section: str) -> list[dict]:
    """The bench result files the text names, in order of mention."""
    names = re.findall(r"`(benchmarks/results/[^`]+\.json)`", section)
    return [json.loads((REPO / name).read_text()) for name in names]


def test_readme_performance_figures_match_the_named_bench_file():
    section = _performance_section()
    named = _named_results(section)
    assert len(named) == 2, "the Performance section names the bf16 run's file and the fp8 run's file"
    results = named[0]
    caption = results["profiles"]["caption"]["engines"]
    vqa = results["profiles"]["vqa"]["engines"]
    best = max((e for n, e in caption.items() if n.startswith("hf_")), key=lambda e: e["images_per_s"])
    assert _figure(section, r"ran \*\*([\d.]+) images/s end to end") == round(caption["dvl"]["images_per_s"], 1)
    assert _figure(section, r"\*\*([\d.]+) for transformers' static-cache") == round(best["images_per_s"], 1)
    assert _figure(section, r"\(\*\*([\d.]+)x\*\*;") == round(caption["dvl"]["ratio_vs_best_generate"], 2)
    assert _figure(section, r"\*\*([\d.]+) answers/s\*\*") == round(vqa["dvl"]["answers_per_s"], 1)
    assert _figure(section, r"\(([\d.]+)x the caption rate") == round(
        results["vqa_answers_per_s_over_caption_images_per_s"], 2
    )
    identical = re.search(r"(\d+)/(\d+) answers identical", section.replace("\n", " "))
    notes = " ".join(results["profiles"]["caption"]["notes"])
    assert identical and f"identical to generate: {identical.group(1)}/{identical.group(2)} answers" in notes


def _option_row(text: str, option: str) -> str:
    row = re.search(rf"^\| `{re.escape(option)}` \|.*$", text, re.M)
    assert row, f"the options table has no {option} row"
    return row.group(0)


def test_readme_fp8_figures_match_the_fp8_bench_file():
    """The fp8 sentence of the Performance section, and the two fp8 rows of the options
    table against the file each row names (an older run, with the mixed formats too)."""
    readme = (REPO / "README.md").read_text()
    fp8 = _named_results(_performance_section())[1]
    engines = fp8["profiles"]["caption"]["engines"]
    both = engines["dvl_w_fp8_kv_fp8"]
    text = _performance_section().replace("\n", " ")
    assert _figure(text, r"a caption run reached ([\d.]+) images/s") == round(both["images_per_s"], 1)
    assert _figure(text, r"images/s \(([\d.]+)x bf16 in its own run") == round(both["ratio_vs_dvl"], 2)
    differ = re.search(r"answers differ from bf16 on (\d+) of (\d+) random-weight captions", text)
    notes = " ".join(fp8["profiles"]["caption"]["notes"])
    same = int(differ.group(2)) - int(differ.group(1))
    assert f"fp8 weights, fp8 KV (end to end) answers identical to dvl-batch (end to end): {same}/{differ.group(2)}" in notes

    row = _option_row(readme, "--quantize fp8")
    (named,) = _named_results(row)
    engines = named["profiles"]["caption"]["engines"]
    bf16, both = round(engines["dvl"]["images_per_s"], 1), engines["dvl_w_fp8_kv_fp8"]
    weights = re.search(r"captions ([\d.]+)x faster than bf16 \(([\d.]+) vs ([\d.]+) img/s; with `--kv-dtype fp8` too, "
                        r"([\d.]+) img/s, ([\d.]+)x", row)
    assert weights, "the --quantize fp8 row states its measured rates"
    assert [float(x) for x in weights.groups()] == [
        round(engines["dvl_w_fp8"]["ratio_vs_dvl"], 2), round(engines["dvl_w_fp8"]["images_per_s"], 1), bf16,
        round(both["images_per_s"], 1), round(both["ratio_vs_dvl"], 2)]
    row = _option_row(readme, "--kv-dtype fp8")
    (named,) = _named_results(row)
    engines = named["profiles"]["caption"]["engines"]
    kv = re.search(r"it captions ([\d.]+)x faster than bf16 \(([\d.]+) vs ([\d.]+) img/s", row)
    assert kv, "the --kv-dtype fp8 row states its measured rates"
    assert [float(x) for x in kv.groups()] == [
        round(engines["dvl_kv_fp8"]["ratio_vs_dvl"], 2), round(engines["dvl_kv_fp8"]["images_per_s"], 1),
        round(engines["dvl"]["images_per_s"], 1)]


def test_readme_identical_count_with_the_vision_epilogue_is_run_14s():
    """The sentence on the engine's own arithmetic quotes run 14, the first bench run with the
    vision GELU in fc1's epilogue (on by default)."""
    text = _performance_section().replace("\n", " ")
    quoted = re.search(r"run 14 had (\d+) of (\d+) answers identical", text)
    run = json.loads((REPO / "benchmarks/results/bench-both-4096-h200-run14.json").read_text())
    assert quoted and run["config"]["vision_epilogue"] is True
    assert f"identical to generate: {quoted.group(1)}/{quoted.group(2)} answers" in " ".join(
        run["profiles"]["caption"]["notes"])
