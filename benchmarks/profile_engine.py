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
    parser.add_argument("--slots", default="64,128,256,384")
    parser.add_argument("--prefill", default="8,16,32,64")
    args = parser.parse_args()

    from dvl_batch.api import default_cache_dir
    from dvl_batch.bench import BENCH_SYSTEM_PROMPT, build_model
    from dvl_batch.engine.attention import AttentionStep
    from dvl_batch.engine.continuous import SlotEngine, _Layout
    from dvl_batch.engine.model import VisionLanguageModel
    from dvl_batch.images import views_from_image_processor
    from dvl_batch.prompts import PromptRenderer
    from dvl_batch.spec import BatchSpec, GenerationSpec

    device = torch.device("cuda")
    model, processor, _ = build_model("real-1.3b", device, torch.bfloat16, default_cache_dir())
    vlm = VisionLanguageModel(model)
    views = views_from_image_processor(processor.image_processor)
    prompt = PromptRenderer(processor, BENCH_SYSTEM_PROMPT).tokenize("Describe this image.", 1)
    length = len(prompt.input_ids)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_tokens": length}
    rows = []

    with torch.inference_mode():
        for n in [int(x) for x in args.prefill.split(",")]:
            pixels = {"pixel_values": torch.randn(n, 3, 384, 384, device=device, dtype=torch.bfloat16)}
            t = timed(lambda: vlm.image_features(pixels))
            rows.append(("vision+aligner", n, t * 1000, t / n * 1000))

        eos = processor.tokenizer.eos_token_id
        for slots in [int(x) for x in args.slots.split(",")]:
            engine = SlotEngine(vlm, views, GenerationSpec(max_new_tokens=128), BatchSpec(batch_size=slots, cuda_graphs=True), [eos], eos)
            engine.rows_per_group = 1
            engine._allocate(_Layout(slots, 1, length, 128))
            engine.group_prefix.fill_(length)
            engine.row_prefix.fill_(length)
            engine.row_len.fill_(36)  # mid-answer: the average context of caption-varlen
            eager = timed(engine._decode_step_body)
            engine.row_len.fill_(36)
            graph = timed(engine.graph.replay)
            weights = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
            weights += model.lm_head.weight.numel() * 2
            kv = engine.kv.prefix_k.numel() * 2 * 2 + engine.kv.suffix_k.numel() * 2 * 2
            rows.append(("decode step eager", slots, eager * 1000, eager / slots * 1000))
            rows.append(("decode step graph", slots, graph * 1000, graph / slots * 1000))
            results.setdefault("decode", []).append(
                {"slots": slots, "eager_ms": eager * 1000, "graph_ms": graph * 1000, "bytes": weights + kv,
                 "graph_bandwidth_TBps": (weights + kv) / graph / 1e12}
            )
            if slots == 256:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    engine._decode_step_body()
                    torch.cuda.synchronize()
                results["decode_kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            engine.close()
            del engine
            torch.cuda.empty_cache()

        for n in [int(x) for x in args.prefill.split(",")]:
            ids = torch.tensor([prompt.input_ids] * n, device=device)
            embeds = vlm.embed_tokens(ids)
            positions = torch.arange(length, device=device)[None].expand(n, -1)
            from dvl_batch.engine.attention import SlotKV

            kv = SlotKV.allocate(vlm.num_layers, n, n, vlm.num_kv_heads, length, 8, vlm.head_dim, torch.bfloat16, device)
            step = AttentionStep(kv, "prefix", groups=torch.arange(n, device=device))
            t = timed(lambda: vlm.language_forward(embeds, positions, dvl_step=step))
            rows.append(("prefix prefill (LLM)", n, t * 1000, t / n * 1000))
            del kv

    results["rows"] = [dict(zip(("phase", "batch", "ms", "ms_per_item"), r)) for r in rows]
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'phase':<24} {'batch':>6} {'ms':>9} {'ms/item':>9}")
    for phase, batch, ms, per in rows:
        print(f"{phase:<24} {batch:>6} {ms:>9.2f} {per:>9.3f}")
    for entry in results.get("decode", []):
        print(f"decode {entry['slots']} slots: {entry['bytes'] / 1e9:.1f} GB moved, graph {entry['graph_bandwidth_TBps']:.2f} TB/s")
    print(results.get("decode_kernels", ""))


if __name__ == "__main__":
    main()
