"""Start time of the real command, cold and warm: seconds from `dvl-batch caption` to its first part.

A cron job over a few new shards is all start: model load, torch.compile of the vision
and prefix passes, the prefill memory probe, CUDA graph capture of the decode buckets.
This runs the CLI as a user would, on a saved checkpoint of the chosen shape (random
weights of the real 1.3B shape, or the tiny model), over small webdataset shards (so
the first part measures the start, not a long shard), three times:

- cold: an empty compile cache (torch inductor's and Triton's, under the run's cache folder);
- warm: the same cache, a fresh output folder (what the next cron run pays);
- noop: the warm run's folder again: every shard is done, the model must not load.

For each: seconds to the first part file, seconds to the end, and the command's own
summary line. Prints a table; writes JSON (device in the file name).

    python benchmarks/start_time.py --shape real-1.3b --device cuda      # on the GPU
    python benchmarks/start_time.py --shape tiny --device cpu --images 4 # code-path check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def save_checkpoint(shape: str, device: str, cache: Path, folder: Path) -> Path:
    """A from_pretrained-able folder of the shape: random weights with the tiny model's processor."""
    import torch

    from dvl_batch.bench.shapes import build_model

    if (folder / "config.json").exists():
        return folder
    dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, processor, _ = build_model(shape, dev, dtype, cache)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    return folder


def run_once(label: str, args: list[str], env: dict[str, str], out: Path, timeout: float) -> dict:
    """One CLI run: time to the first part in OUT/parts, time to exit, its last stderr lines."""
    parts = out / "parts"
    done_before = parts.is_dir() and any(parts.glob("*.parquet"))  # the noop run: nothing new to write
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvl_batch", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first_part = None
    while proc.poll() is None and time.perf_counter() - started < timeout:
        if first_part is None and not done_before and parts.is_dir() and any(parts.glob("*.parquet")):
            first_part = time.perf_counter() - started
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    stderr = proc.communicate()[1]
    total = time.perf_counter() - started
    if first_part is None and not done_before and parts.is_dir() and any(parts.glob("*.parquet")):
        first_part = total  # written in the last polling interval
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {"run": label, "returncode": proc.returncode, "first_part_s": first_part, "total_s": round(total, 2),
            "start_phases_s": start_phases(lines), "tail": lines[-3:]}


def start_phases(lines: list[str]) -> dict[str, float]:
    """The summary's 'start: load, compile, graphs, probe' row (seconds), as numbers."""
    row = next((line for line in lines if "start: load, compile" in line), None)
    if row is None:
        return {}
    seconds = re.findall(r"[0-9]+\.[0-9]+", row.split("probe", 1)[-1])
    return dict(zip(("load", "compile", "graphs", "probe"), map(float, seconds), strict=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="real-1.3b", choices=["real-1.3b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=96, help="images in the run (small shards of --per-shard)")
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the checkpoint, shards, caches and outputs")
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--json", default=None)
    parser.add_argument("--cli-args", default="", help="more options for every run, e.g. '--compile' (default: the CLI's own)")
    args = parser.parse_args()

    from dvl_batch.bench.corpus import make_jpeg_shards

    work = Path(args.work or tempfile.mkdtemp(prefix="dvl-start-"))
    cache = work / "cache"
    checkpoint = save_checkpoint(args.shape, args.device, cache, work / f"checkpoint-{args.shape}")
    shards = make_jpeg_shards(work / "shards", args.images, args.per_shard, 640, os.cpu_count() or 1)
    compile_cache = work / f"compile-cache-{time.time_ns()}"  # empty: the first run is cold
    env = dict(os.environ, DVL_BATCH_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TORCHINDUCTOR_CACHE_DIR=str(compile_cache / "torch-compile"), TRITON_CACHE_DIR=str(compile_cache / "triton"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    runs = []
    for label, out in (("cold", work / "out-cold"), ("warm", work / "out-warm"), ("noop", work / "out-warm")):
        cli = ["caption", *map(str, shards), "-o", str(out), "--model", str(checkpoint), "--device", args.device,
               "--workers", str(args.workers), "--no-progress", *args.cli_args.split()]
        runs.append(run_once(label, cli, env, out, args.timeout))
        print(f"{label}: {runs[-1]}", file=sys.stderr, flush=True)
    device = args.device
    if device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name()
    report = {"shape": args.shape, "device": device, "images": args.images, "per_shard": args.per_shard,
              "cli_args": args.cli_args, "runs": runs,
              "host": platform.node()}
    print(f"start time, {args.shape} on {device}, {args.images} images in shards of {args.per_shard}")
    print(f"{'run':<6} {'rc':>3} {'first part s':>13} {'total s':>9}  start phases (s)")
    for r in runs:
        first = f"{r['first_part_s']:.1f}" if r["first_part_s"] is not None else "-"
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["start_phases_s"].items())
        print(f"{r['run']:<6} {r['returncode']:>3} {first:>13} {r['total_s']:>9.1f}  {phases}")
    name = args.json or str(REPO / "benchmarks" / "results" / f"start-time-{args.shape}-{device.replace(' ', '-').lower()}.json")
    Path(name).write_text(json.dumps(report, indent=2))
    print(f"results written to {name}")


if __name__ == "__main__":
    main()
