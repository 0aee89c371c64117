"""Benchmark programs keep working against the engines (tiny model, CPU): bench.py, benchmarks/."""

from __future__ import annotations

import importlib.util
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


def test_bench_command_compares_with_generate_on_the_tiny_model(tmp_path, cache_dir):
    """`dvl-batch bench` runs both engines on the same generated shards and reports a ratio.
    Repeated `--quantize` runs the slot engine once per weight format, side by side, on a
    quantized copy (int8 weight-only is the format a CPU has). fp8 weights and `--kv-dtype
    fp8` are GPU only, refused on CPU up front, below."""
    report = tmp_path / "bench.json"
    args = [sys.executable, "-m", "dvl_batch", "bench", "--shape", "tiny", "--device", "cpu", "--requests", "6",
            "--images-per-shard", "3", "--image-side", "256", "--max-new-tokens", "8", "--hf-batch-size", "6",
            "--hf-cache", "dynamic", "--no-compile", "--no-cuda-graphs", "--no-triton-attention", "--workers", "1",
            "--data-dir", str(tmp_path / "data"), "--out", str(report)]
    formats = ["--quantize", "none", "--quantize", "int8wo"] if importlib.util.find_spec("torchao") else []
    result = subprocess.run([*args, *formats], env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "img/s" in result.stdout and "outputs identical to generate: 6/6" in result.stdout
    assert "nan" not in result.stdout  # no GPU: no peak memory, shown as '-'
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("profile"))
    rows = [line for line in lines[header + 2:] if line.startswith("caption")]
    assert rows and all(len(row) == len(lines[header]) for row in rows)  # columns line up with the header
    caption = json.loads(report.read_text())["profiles"]["caption"]["engines"]
    assert caption["dvl"]["images_per_s"] > 0 and caption["dvl"]["ratio_vs_best_generate"] > 0
    if formats:
        assert caption["dvl_w_int8wo"]["ratio_vs_dvl"] > 0 and caption["dvl_w_int8wo"]["ratio_vs_best_generate"] > 0
        assert "int8wo weights" in result.stdout, "the quantized run's agreement with the bf16 run is printed"
    refused = subprocess.run([*args, "--kv-dtype", "auto", "--kv-dtype", "fp8"], env=cli_env(cache_dir),
                             capture_output=True, text=True, timeout=120)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "--kv-dtype fp8 needs a CUDA GPU" in errors[0], refused.stderr
    refused = subprocess.run([*args, "--quantize", "none", "--quantize", "fp8"], env=cli_env(cache_dir),
                             capture_output=True, text=True, timeout=120)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "--quantize fp8 needs a CUDA GPU" in errors[0], refused.stderr


def test_bench_preprocess_profile_measures_decode_rate_per_core(tmp_path, cache_dir):
    report = tmp_path / "pre.json"
    args = [sys.executable, "-m", "dvl_batch", "bench", "--profile", "preprocess", "--requests", "8",
            "--images-per-shard", "4", "--data-dir", str(tmp_path / "data"), "--out", str(report)]
    result = subprocess.run(args, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "img/s/core" in result.stdout
    rows = {r["path"]: r for r in json.loads(report.read_text())["preprocess"]}
    assert set(rows) == {"fast (draft decode)", "exact (processor)"}
    assert all(r["images"] == 8 and r["errors"] == 0 and r["images_per_s_per_core"] > 0 for r in rows.values())


def test_start_time_benchmark_measures_cold_warm_and_a_run_with_nothing_to_do(tmp_path, cache_dir):
    report = tmp_path / "start.json"
    args = [sys.executable, str(REPO / "benchmarks" / "start_time.py"), "--shape", "tiny", "--device", "cpu",
            "--images", "2", "--per-shard", "1", "--workers", "1", "--work", str(tmp_path / "work"), "--json", str(report)]
    result = subprocess.run(args, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "first part s" in result.stdout
    runs = {r["run"]: r for r in json.loads(report.read_text())["runs"]}
    assert all(r["returncode"] == 0 for r in runs.values())
    assert runs["cold"]["first_part_s"] > 0 and runs["warm"]["first_part_s"] > 0
    assert set(runs["cold"]["start_phases_s"]) == {"load", "compile", "graphs", "probe"}, "the summary's start row"
    assert runs["cold"]["start_phases_s"]["load"] > 0
    assert runs["noop"]["first_part_s"] is None and "nothing to do" in runs["noop"]["tail"][-1]
    assert runs["noop"]["total_s"] < runs["warm"]["total_s"], "a run with nothing to do must not load the model"
    assert (tmp_path / "work" / "cache").is_dir()
