"""How fast can this GPU read memory: is decode attention at the ceiling or at torch's copy rate?

The bench compares decode attention's achieved bytes/s with a device-to-device copy (reads +
writes). Decode attention only reads, and on the H200 it matches the copy rate (4.29 vs 4.27
TB/s) while HBM3e is rated 4.8. This measures the read ceiling itself: a Triton kernel that
only streams a large buffer into a sum, over block sizes, warps and pipeline stages, against
torch's copy and torch's sum, and on green contexts of fewer SMs (how many SMs a pure read
needs to reach the ceiling; 0h found decode attention linear in its SMs).

Run: python benchmarks/read_bandwidth.py --json read-bandwidth-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Each program sums ITERS consecutive blocks of BLOCK int32 words (a read-only stream)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0)
    tl.store(out + tl.program_id(0), tl.sum(acc))


def read_seconds(words: torch.Tensor, block: int, iters: int, warps: int, stages: int) -> float:
    from dvl_batch.bench.device_time import median_device_seconds

    grid = triton.cdiv(words.numel(), block * iters)
    out = torch.empty(grid, dtype=torch.int32, device=words.device)
    return median_device_seconds(
        lambda: _read_kernel[(grid,)](words, out, words.numel(), BLOCK=block, ITERS=iters, num_warps=warps, num_stages=stages),
        repeats=5, warmups=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="read-bandwidth.json")
    parser.add_argument("--gib", type=float, default=4.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: read_bandwidth.py measures a GPU's memory; no CUDA device here", file=sys.stderr)
        raise SystemExit(2)
    from dvl_batch.bench.device_time import copy_bandwidth, median_device_seconds

    words = torch.ones(int(args.gib * 2**30) // 4, dtype=torch.int32, device="cuda")
    nbytes = words.numel() * 4
    result: dict = {"device": torch.cuda.get_device_name(), "gib": args.gib, "rows": []}

    def row(name: str, seconds: float) -> None:
        result["rows"].append({"case": name, "ms": seconds * 1000, "TBps": nbytes / seconds / 1e12})
        print(f"{name:<48} {seconds * 1000:8.3f} ms  {nbytes / seconds / 1e12:5.2f} TB/s", flush=True)
        Path(args.json).write_text(json.dumps(result, indent=2))

    result["copy_TBps"] = copy_bandwidth(gib=2.0) / 1e12
    print(f"torch copy (read + write)  {result['copy_TBps']:.2f} TB/s", flush=True)
    row("torch sum (read only)", median_device_seconds(lambda: words.sum(), repeats=5, warmups=1))
    best = None
    for block in (1024, 4096):
        for iters in (8, 32):
            for warps in (4, 8):
                for stages in (1, 3):
                    t = read_seconds(words, block, iters, warps, stages)
                    row(f"triton read block {block} iters {iters} warps {warps} stages {stages}", t)
                    best = min(best or (t, block, iters, warps, stages), (t, block, iters, warps, stages))
    _, block, iters, warps, stages = best
    from sm_partition import green_stream  # the benchmark beside this one

    for sms in (32, 64, 96, 112):
        stream = green_stream(sms)
        with torch.cuda.stream(stream):
            row(f"best triton read on green {sms} SMs", read_seconds(words, block, iters, warps, stages))


if __name__ == "__main__":
    main()
