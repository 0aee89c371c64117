"""Where the slot engine's time goes, phase by phase, on random weights of the 1.3B shape.

Not the product benchmark (that is `dvl-batch bench`): this times the engine's pieces
in isolation so that optimisation work can be aimed. It prints a table and writes JSON:

- vision tower + aligner per image, at several batch sizes;
- prefix prefill (whole caption prompt) per image, at several batch sizes;
- one decode step (eager and CUDA graph) at several slot counts, with the bytes it
  must move (weights + KV actually read) and the resulting bandwidth;
- the top CUDA kernels of an eager decode step (torch.profiler).

Run: python benchmarks/profile_engine.py --out profile.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of fn() after one warm-up, with device synchronisation."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1000)
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--slots", default="64,256,384")
    parser.add_argument("--prefill", default="16,32,64")
    args = parser.parse_args()

    from dvl_batch.api import default_cache_dir
    from dvl_batch.bench import BENCH_SYSTEM_PROMPT, build_model
    from dvl_batch.config.spec import GenerationSpec
    from dvl_batch.engine.model import VisionLanguageModel
    from dvl_batch.engine.slots import Layout, SlotStore
    from dvl_batch.preprocess.images import views_from_image_processor
    from dvl_batch.preprocess.prompts import PromptRenderer

    device = torch.device("cuda")
    model, processor, _ = build_model("real-1.3b", device, torch.bfloat16, default_cache_dir())
    vlm = VisionLanguageModel(model)
    views = views_from_image_processor(processor.image_processor)
    prompt = PromptRenderer(processor, BENCH_SYSTEM_PROMPT).tokenize("Describe this image.", 1)
    length = len(prompt.input_ids)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_tokens": length}
    rows = []

    with torch.inference_mode():
        eos = processor.tokenizer.eos_token_id
        weights = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
        weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
        for compiled in (False, True):
            label = "compiled" if compiled else "eager"
            for slots in [int(x) for x in args.slots.split(",")] if not compiled else [256]:
                started = time.perf_counter()
                store = SlotStore(vlm, {v.name: v for v in views}, Layout(slots, 1, length, 128), GenerationSpec(max_new_tokens=128),
                                  eos, eos, prefill_batch=32, compile_steps=compiled, cuda_graphs=True)
                setup = time.perf_counter() - started
                store.group_prefix.fill_(length)
                store.row_prefix.fill_(length)
                store.row_len.fill_(36)  # mid-answer: the average context of caption-varlen
                body = timed(store._decode_body)
                store.row_len.fill_(36)
                graph = timed(store.graph.replay)
                kv = (store.kv.prefix_k[:, :slots].numel() + store.kv.suffix_k.numel()) * 2 * 2
                rows.append((f"decode step body {label}", slots, body * 1000, body / slots * 1000))
                rows.append((f"decode step graph {label}", slots, graph * 1000, graph / slots * 1000))
                results.setdefault("decode", []).append(
                    {"compiled": compiled, "slots": slots, "setup_s": setup, "body_ms": body * 1000, "graph_ms": graph * 1000,
                     "bytes": weights + kv, "graph_bandwidth_TBps": (weights + kv) / graph / 1e12}
                )
                if slots == 256 and not compiled:
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        store._decode_body()
                        torch.cuda.synchronize()
                    results["decode_kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
                if slots == (256 if compiled else min(int(x) for x in args.slots.split(","))):
                    for n in [int(x) for x in args.prefill.split(",")] if not compiled else [32]:
                        if n > slots:
                            continue
                        store.prefill_batch = n
                        prefixes = [list(prompt.input_ids)] * n
                        feats = [torch.randn(1, 576, vlm.hidden_size, device=device, dtype=torch.bfloat16)] * n
                        if compiled:
                            store.prefix_fn = torch.compile(store._prefix_pass, dynamic=False)
                        t = timed(lambda store=store, prefixes=prefixes, n=n, feats=feats: store.prefill_prefixes(prefixes, list(range(n)), feats))
                        rows.append((f"prefix prefill {label}", n, t * 1000, t / n * 1000))
                        pixels = [(i, {"pixel_values": torch.randint(0, 255, (1, 3, 384, 384), dtype=torch.uint8)}) for i in range(n)]
                        if compiled:
                            store.vision_fn = torch.compile(vlm.image_features, dynamic=False)
                        t = timed(lambda store=store, pixels=pixels: store.encode_images(pixels))
                        rows.append((f"encode images {label}", n, t * 1000, t / n * 1000))
                del store
                gc.collect()
                torch.cuda.empty_cache()

    results["rows"] = [dict(zip(("phase", "batch", "ms", "ms_per_item"), r, strict=True)) for r in rows]
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'phase':<24} {'batch':>6} {'ms':>9} {'ms/item':>9}")
    for phase, batch, ms, per in rows:
        print(f"{phase:<24} {batch:>6} {ms:>9.2f} {per:>9.3f}")
    for entry in results.get("decode", []):
        print(f"decode {entry['slots']} slots compiled={entry['compiled']}: {entry['bytes'] / 1e9:.1f} GB moved, "
              f"graph {entry['graph_bandwidth_TBps']:.2f} TB/s, setup {entry['setup_s']:.1f} s")
    print(results.get("decode_kernels", ""))


if __name__ == "__main__":
    main()
