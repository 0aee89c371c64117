"""benchmarks/quant_and_7b.py keeps working against the engines (narrow layers, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO, cli_env


def test_quant_and_7b_benchmark_runs_at_tiny_scale(tmp_path, cache_dir):
    report = tmp_path / "report.json"
    args = [sys.executable, str(REPO / "benchmarks" / "quant_and_7b.py"), "--scale", "tiny", "--device", "cpu",
            "--models", "1.3b", "--modes", "bf16", "fp8", "--requests", "3", "--generate-requests", "2",
            "--max-new-tokens", "4", "--cache-dir", str(cache_dir), "--json", str(report)]
    result = subprocess.run(args, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| model | weights | engine |" in result.stdout
    runs = {(r["weights"], r["engine"]): r for r in json.loads(report.read_text())["runs"]}
    for engine in ("slot", "generate"):
        assert runs[("bf16", engine)]["error"] is None and runs[("bf16", engine)]["images_per_second"] > 0
        assert runs[("fp8", engine)]["note"].startswith("skipped:"), "fp8 cannot run on a CPU and says so"
