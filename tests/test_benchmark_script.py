"""Benchmark programs keep working against the engines (tiny model, CPU): bench.py, benchmarks/."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from .cli_processes import Overlapped
from .conftest import REPO, cli_env, run_cli

BENCH_FORMATS = ["--quantize", "none", "--quantize", "int8wo"] if importlib.util.find_spec("torchao") else []


def bench_args(folder) -> list[str]:
    return [sys.executable, "-m", "dvl_batch", "bench", "--shape", "tiny", "--device", "cpu", "--requests", "6",
            "--images-per-shard", "3", "--image-side", "256", "--max-new-tokens", "8", "--hf-batch-size", "6",
            "--hf-cache", "dynamic", "--no-compile", "--no-cuda-graphs", "--no-triton-attention", "--workers", "1",
            "--data-dir", str(folder / "data"), "--out", str(folder / "bench.json")]


@pytest.fixture(scope="module")
def started(tmp_path_factory, cache_dir, tiny_model_dir, tiny_hybrid_dir):
    """Every command of this module, started on first use, two at a time, longest first: each has its
    own folders and reports (the tiny models they read are built beforehand), so they overlap instead
    of queueing, and each test waits for and checks its own."""
    env = cli_env(cache_dir)
    folder = {name: tmp_path_factory.mktemp(name) for name in ("quant", "bench", "pre", "start", "attn")}
    commands = {
        "start": [sys.executable, str(REPO / "benchmarks" / "start_time.py"), "--shape", "tiny", "--device", "cpu",
                  "--images", "2", "--per-shard", "1", "--workers", "1", "--work", str(folder["start"] / "work"),
                  "--json", str(folder["start"] / "start.json")],
        "bench": [*bench_args(folder["bench"]), *BENCH_FORMATS],
        "quant": [sys.executable, str(REPO / "benchmarks" / "quant_and_7b.py"), "--scale", "tiny", "--device", "cpu",
                  "--models", "1.3b", "--modes", "bf16", "fp8", "--requests", "3", "--generate-requests", "2",
                  "--max-new-tokens", "4", "--cache-dir", str(cache_dir), "--json", str(folder["quant"] / "report.json")],
        "pre": [sys.executable, "-m", "dvl_batch", "bench", "--profile", "preprocess", "--requests", "8",
                "--images-per-shard", "4", "--data-dir", str(folder["pre"] / "data"), "--out", str(folder["pre"] / "pre.json")],
        "attn": [sys.executable, str(REPO / "benchmarks" / "prefill_attention.py"), "--small", "--device", "cpu",
                 "--json", str(folder["attn"] / "attn.json")],
        # the refusals get folders of their own: the bench above may still be writing its shards
        "bench-kv-fp8": [*bench_args(folder["bench"] / "kv"), "--kv-dtype", "auto", "--kv-dtype", "fp8"],
        "bench-fp8": [*bench_args(folder["bench"] / "fp8"), "--quantize", "none", "--quantize", "fp8"],
        "bench-device-profile": [*bench_args(folder["bench"] / "dp"), "--skip-hf", "--device-profile", str(folder["bench"] / "k.txt")],
    }
    timeouts = {"bench-kv-fp8": 120, "bench-fp8": 120, "bench-device-profile": 120}
    overlapped = Overlapped({name: (args, env, timeouts.get(name, 300)) for name, args in commands.items()})
    yield overlapped, folder
    overlapped.close()


def test_quant_and_7b_benchmark_runs_at_tiny_scale(started):
    commands, folder = started
    report = folder["quant"] / "report.json"
    result = commands.result("quant")
    assert result.returncode == 0, result.stderr
    assert "| model | weights | engine |" in result.stdout
    runs = {(r["weights"], r["engine"]): r for r in json.loads(report.read_text())["runs"]}
    for engine in ("slot", "generate"):
        assert runs[("bf16", engine)]["error"] is None and runs[("bf16", engine)]["images_per_second"] > 0
        assert runs[("fp8", engine)]["note"].startswith("skipped:"), "fp8 cannot run on a CPU and says so"


def test_bench_command_compares_with_generate_on_the_tiny_model(started):
    """`dvl-batch bench` runs both engines on the same generated shards and reports a ratio.
    Repeated `--quantize` runs the slot engine once per weight format, side by side, on a
    quantized copy (int8 weight-only is the format a CPU has). fp8 weights and `--kv-dtype
    fp8` are GPU only, refused on CPU up front, below."""
    commands, folder = started
    report = folder["bench"] / "bench.json"
    formats = BENCH_FORMATS
    result = commands.result("bench")
    assert result.returncode == 0, result.stderr
    assert "img/s" in result.stdout and "outputs identical to generate: 6/6" in result.stdout
    assert "nan" not in result.stdout  # no GPU: no peak memory, shown as '-'
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("profile"))
    rows = [line for line in lines[header + 2:] if line.startswith("caption")]
    assert rows and all(len(row) == len(lines[header]) for row in rows)  # columns line up with the header
    caption = json.loads(report.read_text())["profiles"]["caption"]["engines"]
    assert caption["dvl"]["images_per_s"] > 0 and caption["dvl"]["ratio_vs_best_generate"] > 0
    assert 0 < caption["dvl"]["first_sample_seconds"] < caption["dvl"]["seconds"]  # the decoders' start-up
    if formats:
        assert caption["dvl_w_int8wo"]["ratio_vs_dvl"] > 0 and caption["dvl_w_int8wo"]["ratio_vs_best_generate"] > 0
        assert "int8wo weights" in result.stdout, "the quantized run's agreement with the bf16 run is printed"
    refused = commands.result("bench-kv-fp8")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "--kv-dtype fp8 needs a CUDA GPU" in errors[0], refused.stderr
    refused = commands.result("bench-fp8")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "--quantize fp8 needs a CUDA GPU" in errors[0], refused.stderr
    refused = commands.result("bench-device-profile")  # it traces GPU kernels: one clear line on a CPU
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "--device-profile" in errors[0], refused.stderr


def test_bench_prints_its_table_once(tmp_path, cache_dir, tiny_model_dir):
    """On a terminal stdout and stderr show together: the result table goes to stdout once, and
    the per-profile table on stderr is only for a profile another one follows (`--profile both`)."""
    args = ["bench", "--shape", "tiny", "--device", "cpu", "--requests", "2", "--images-per-shard", "2", "--image-side",
            "64", "--max-new-tokens", "2", "--skip-hf", "--no-compile", "--no-cuda-graphs", "--no-triton-attention",
            "--workers", "0", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "bench.json")]
    result = run_cli(args, cache_dir, timeout=120)  # the smallest bench: dvl-batch alone, 2 images, in-process
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("profile"))
    assert (result.stdout + result.stderr).count(header) == 1, result.stderr
    assert "caption dvl-batch (end to end)" in result.stdout


def test_bench_preprocess_profile_measures_decode_rate_per_core(started):
    commands, folder = started
    report = folder["pre"] / "pre.json"
    result = commands.result("pre")
    assert result.returncode == 0, result.stderr
    assert "img/s/core" in result.stdout
    rows = {r["path"]: r for r in json.loads(report.read_text())["preprocess"]}
    assert set(rows) == {"fast (draft decode)", "exact (processor)"}
    assert all(r["images"] == 8 and r["errors"] == 0 and r["images_per_s_per_core"] > 0 for r in rows.values())


def test_start_time_benchmark_measures_cold_warm_and_a_run_with_nothing_to_do(started):
    commands, folder = started
    report = folder["start"] / "start.json"
    result = commands.result("start")
    assert result.returncode == 0, result.stderr
    assert "first part s" in result.stdout
    runs = {r["run"]: r for r in json.loads(report.read_text())["runs"]}
    assert all(r["returncode"] == 0 for r in runs.values())
    assert runs["cold"]["first_part_s"] > 0 and runs["warm"]["first_part_s"] > 0
    assert set(runs["cold"]["start_phases_s"]) == {"load", "compile", "graphs", "probe"}, "the summary's start row"
    assert runs["cold"]["start_phases_s"]["load"] > 0
    assert runs["noop"]["first_part_s"] is None and "nothing to do" in runs["noop"]["tail"][-1]
    assert runs["noop"]["total_s"] < runs["warm"]["total_s"], "a run with nothing to do must not load the model"
    assert (folder["start"] / "work" / "cache").is_dir()


def test_prefill_attention_program_checks_every_layout_against_the_whole_prompt(started):
    """benchmarks/prefill_attention.py (shrunk shapes, CPU): the engine's zero-query layout and the
    bottom-right causal one give the whole prompt's attention for the prompt's own tokens, eager
    and compiled, and so does FlexAttention's block mask (and its unmasked vision tower); a table
    is printed and every row lands in the JSON."""
    commands, folder = started
    result = commands.result("attn")
    assert result.returncode == 0, result.stderr
    rows = json.loads((folder["attn"] / "attn.json").read_text())["rows"]
    variants = {row["variant"] for row in rows}
    assert variants == {"vision tower", "LM, no shared head", "LM, zero queries in front", "LM, causal bottom-right"}
    has_flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    timed = [row for row in rows if has_flex or row["backend"] != "FLEX"]
    assert all("error" not in row and row["max_abs_diff"] < 1e-5 and row["ms_per_image"] > 0 for row in timed), rows
    assert {row["compiled"] for row in rows} == {False, True}
    flex = {row["variant"] for row in rows if row["backend"] == "FLEX"}
    assert flex == {"vision tower", "LM, causal bottom-right"}  # rows with an error where torch lacks it (< 2.5)
    assert "LM, causal bottom-right" in result.stdout and "ms/image" in result.stdout


@pytest.mark.parametrize("script", ["sm_partition.py", "read_bandwidth.py", "weight_formats.py", "epilogues.py"])
def test_gpu_only_benchmarks_refuse_a_machine_without_cuda_in_one_line(script, cache_dir):
    """They time CUDA streams and memory and have nothing to measure on a CPU."""
    import subprocess

    env = {**cli_env(cache_dir), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "no CUDA device" in errors[0], done.stderr
