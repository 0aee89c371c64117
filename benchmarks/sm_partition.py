"""Can the prefill and the decode steps share the GPU better than by taking turns?

Decode attention is bound by memory bandwidth, the prefill (vision tower + prefix pass) by
matmul throughput. On two plain streams their kernels mostly take turns (each grid fills
every SM), so the engine's overlapped prefill gained ~1.5% (BENCHMARKS 0g). A CUDA green
context confines a stream to a number of SMs. If decode attention keeps most of its bandwidth
on a fraction of the SMs, the prefill confined to the rest could run beside it nearly at full
speed and the two phases would overlap for real. This measures that, device time only:

- each piece alone on all SMs and on green contexts of several SM counts (the curve of
  bandwidth or MFU against SMs);
- whether two green contexts of the same size share their SMs or get disjoint ones;
- the prefill and the decode work issued together, each on its own stream (plain or green),
  against the sum of their times alone: the fraction of device time a partition would save.

Run: python benchmarks/sm_partition.py --json sm-partition-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def green_stream(sms: int, device_index: int = 0) -> torch.cuda.Stream:
    """A stream confined to `sms` SMs by a CUDA green context (torch >= 2.10; the signature of
    `GreenContext.create` changed between releases). The stream keeps its context alive."""
    from torch.cuda.green_contexts import GreenContext

    try:
        context = GreenContext.create(num_sms=sms, device_id=device_index)
    except TypeError:
        context = GreenContext.create(sms, device_index)
    stream = context.Stream()
    stream._green_context = context
    return stream


def together_seconds(work: list[tuple[torch.cuda.Stream | None, object]], repeats: int = 5) -> float:
    """Median device seconds from a common start to the end of every (stream, fn) pair.

    A sleep kernel holds the device while the host enqueues everything, so that the host's
    launch time does not decide which stream starts first."""
    main = torch.cuda.current_stream()
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(200_000_000)
        start.record(main)
        for stream, fn in work:
            if stream is not None:
                stream.wait_stream(main)
            with torch.cuda.stream(stream or main):
                fn()
        for stream, _ in work:
            if stream is not None:
                main.wait_stream(stream)
        end.record(main)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times[1:])


class Workloads:
    """The engine's own prefill and decode-attention calls on random weights of the 1.3B shape."""

    def __init__(self, live_rows: int, prefill_batch: int, attn_calls: int):
        from dvl_batch.api import default_cache_dir
        from dvl_batch.bench import BENCH_SYSTEM_PROMPT, build_model
        from dvl_batch.config.spec import GenerationSpec
        from dvl_batch.engine.model import VisionLanguageModel
        from dvl_batch.engine.planning import Layout
        from dvl_batch.engine.slots import SlotStore
        from dvl_batch.engine.triton_decode import BF16_ONE_ROW_CONFIG, decode_attention
        from dvl_batch.preprocess.images import views_from_image_processor
        from dvl_batch.preprocess.prompts import PromptRenderer

        dev, bf16 = torch.device("cuda"), torch.bfloat16
        model, processor, _ = build_model("real-1.3b", dev, bf16, default_cache_dir())
        self.vlm = VisionLanguageModel(model)
        views = {v.name: v for v in views_from_image_processor(processor.image_processor)}
        prompt = PromptRenderer(processor, BENCH_SYSTEM_PROMPT).tokenize("Describe this image.", 1)
        length, eos = len(prompt.input_ids), processor.tokenizer.eos_token_id
        self.store = SlotStore(self.vlm, views, Layout(prefill_batch, 1, length, 136), GenerationSpec(max_new_tokens=128),
                               eos, eos, prefill_batch=prefill_batch, compile_steps=True, cuda_graphs=True)
        self.batch = prefill_batch
        self.prefixes = [list(prompt.input_ids)] * prefill_batch
        self.pixels = {"pixel_values": torch.randn(prefill_batch, 3, 384, 384, device=dev, dtype=bf16)}
        heads, dim, slots = 16, 128, 826
        pk, pv = (torch.randn(slots + 1, heads, length, dim, device=dev, dtype=bf16) for _ in range(2))
        sk, sv = (torch.randn(slots + 1, heads, 136, dim, device=dev, dtype=bf16) for _ in range(2))
        live = torch.randperm(slots, device=dev)[:live_rows]
        plen = torch.zeros(slots + 1, dtype=torch.long, device=dev)
        plen[live] = length
        rlen = torch.zeros(slots + 1, dtype=torch.long, device=dev)
        rlen[live] = torch.randint(0, 128, (live_rows,), device=dev)
        self.attn_bytes = 2 * heads * dim * 2 * (plen.sum().item() + (rlen[live] + 1).sum().item()) * attn_calls
        q = torch.randn(live_rows, heads, dim, device=dev, dtype=bf16)
        self._attn = lambda: decode_attention(q, pk, pv, sk, sv, plen, rlen, 1, dim**-0.5, 1, BF16_ONE_ROW_CONFIG, live=live)
        self.attn_calls = attn_calls

    @torch.inference_mode()
    def prefill(self) -> None:
        features = self.store.vision_fn(self.pixels)  # the engine's image encoding (its SigLIP epilogue)
        self.store.prefill_prefixes(self.prefixes, list(range(self.batch)), list(features.split(1)))

    @torch.inference_mode()
    def attention(self) -> None:
        for _ in range(self.attn_calls):
            self._attn()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="sm-partition.json")
    parser.add_argument("--live-rows", type=int, default=640)
    parser.add_argument("--prefill-batch", type=int, default=32)
    parser.add_argument("--attn-calls", type=int, default=96, help="decode attention calls per measurement (~1 per layer-step)")
    parser.add_argument("--sms", default="32,64,80,96,112", type=lambda v: [int(s) for s in v.split(",")])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: sm_partition.py shares a GPU's SMs out; no CUDA device here", file=sys.stderr)
        raise SystemExit(2)
    total = torch.cuda.get_device_properties(0).multi_processor_count
    work = Workloads(args.live_rows, args.prefill_batch, args.attn_calls)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sms": total, "rows": []}

    def row(name: str, seconds: float, note: str = "") -> None:
        result["rows"].append({"case": name, "ms": seconds * 1000, "note": note})
        print(f"{name:<52} {seconds * 1000:>9.2f} ms  {note}", flush=True)
        Path(args.json).write_text(json.dumps(result, indent=2))

    prefill = together_seconds([(None, work.prefill)])
    attn = together_seconds([(None, work.attention)])
    row("prefill alone, all SMs", prefill, f"{work.batch} images")
    row("decode attention alone, all SMs", attn, f"{work.attn_bytes / attn / 1e12:.2f} TB/s")
    row("both on one stream (taking turns)", together_seconds([(None, work.prefill), (None, work.attention)]))
    plain = torch.cuda.Stream()
    row("both on two plain streams", together_seconds([(plain, work.prefill), (None, work.attention)]),
        f"sum alone {(prefill + attn) * 1000:.2f} ms")
    try:
        streams = {n: green_stream(n) for n in args.sms}
    except Exception as exc:  # noqa: BLE001 - no green contexts in this torch/driver: say so and stop
        row("green contexts unavailable", 0.0, f"{type(exc).__name__}: {exc}")
        return
    for n, stream in streams.items():
        for name, fn, unit in (("prefill", work.prefill, None), ("decode attention", work.attention, work.attn_bytes)):
            try:
                t = together_seconds([(stream, fn)])
            except Exception as exc:  # noqa: BLE001 - e.g. a kernel the green context cannot launch
                row(f"{name} on green {n} SMs", 0.0, f"failed: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            row(f"{name} on green {n} SMs", t, f"{unit / t / 1e12:.2f} TB/s" if unit else f"{prefill / t:.2f} of all-SM speed")
    half = max(n for n in args.sms if n <= total // 2)
    second = green_stream(half)
    alone = together_seconds([(streams[half], work.prefill)])
    row(f"two green {half}-SM contexts, prefill on each", together_seconds([(streams[half], work.prefill), (second, work.prefill)]),
        f"one alone {alone * 1000:.2f} ms: ~equal means disjoint SMs, ~double means shared")
    for n in args.sms:
        rest = (total - n) // 8 * 8  # green contexts take SMs in groups of 8 on Hopper
        row(f"prefill green {n} + attention on all SMs", together_seconds([(streams[n], work.prefill), (None, work.attention)]),
            f"sum alone {(prefill + attn) * 1000:.2f} ms")
        row(f"attention green {n} + prefill on all SMs", together_seconds([(streams[n], work.attention), (plain, work.prefill)]))
        row(f"prefill green {n} + attention green {rest}",
            together_seconds([(streams[n], work.prefill), (green_stream(rest), work.attention)]))

if __name__ == "__main__":
    main()
