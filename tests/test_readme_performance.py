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


def test_readme_performance_figures_match_the_named_bench_file():
    section = _performance_section()
    named = re.search(r"`(benchmarks/results/[^`]+\.json)`", section)
    assert named, "the Performance section names the bench file its numbers come from"
    results = json.loads((REPO / named.group(1)).read_text())
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
