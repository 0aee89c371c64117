"""Where the slot engine's device time goes, phase by phase, on random weights of the 1.3B shape.

Not the product benchmark (that is `dvl-batch bench`): this times the engine's pieces in
isolation, with CUDA events (device time), so that optimisation work can be aimed. Each
section prints rows of a table; everything also goes to a JSON file.

- vision: vision tower + aligner per image, eager and compiled, several batch sizes, MFU,
  and the top kernels of each (torch.profiler) to show where the time goes;
- prefill: prefix prefill of the whole caption prompt per image, eager and compiled, MFU;
- matmul: the language model's projections as separate and as fused (QKV, gate+up) products;
- attn: decode attention alone over a realistic cache (616-token prefix, ~36-token suffix),
  the Triton kernels under several launch configurations and torch's own SDPA backends,
  with achieved bandwidth against a measured device copy;
- decode: one whole decode step as a CUDA graph at several slot counts, and its top kernels.

Run: python benchmarks/profile_engine.py --out profile.json [--sections vision,prefill,...]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

PEAK_TFLOPS = 790.0  # measured 8192^3 bf16 matmul on the lent H200


def timed(fn) -> float:
    """Median device seconds of fn() over 5 calls after one warm-up."""
    from dvl_batch.bench.device_time import median_device_seconds

    return median_device_seconds(fn, repeats=5, warmups=1)


def release_device_memory() -> None:
    """Give the device memory of a deleted store back before the next section allocates."""
    gc.collect()
    torch.cuda.empty_cache()


def top_kernels(fn, limit: int = 15) -> str:
    """torch.profiler's table of the CUDA kernels of one call of fn, by device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=limit, max_name_column_width=70)


class Profiler:
    def __init__(self, args):
        from dvl_batch.api import default_cache_dir
        from dvl_batch.bench import BENCH_SYSTEM_PROMPT, FlopModel, build_model
        from dvl_batch.engine.model import VisionLanguageModel
        from dvl_batch.preprocess.images import views_from_image_processor
        from dvl_batch.preprocess.prompts import PromptRenderer

        self.args = args
        self.device = torch.device("cuda")
        self.model, self.processor, _ = build_model("real-1.3b", self.device, torch.bfloat16, default_cache_dir())
        self.vlm = VisionLanguageModel(self.model)
        self.views = {v.name: v for v in views_from_image_processor(self.processor.image_processor)}
        self.prompt = PromptRenderer(self.processor, BENCH_SYSTEM_PROMPT).tokenize("Describe this image.", 1)
        self.length = len(self.prompt.input_ids)
        self.flops = FlopModel.of(self.model)
        self.rows: list[tuple] = []
        self.results: dict = {
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_tokens": self.length,
            "vision_attn": getattr(self.model.config.vision_config, "_attn_implementation", None),
            "tables": {},
        }

    def row(self, phase: str, batch: int, seconds: float, per_item_ms: float, note: str = "") -> None:
        self.rows.append((phase, batch, seconds * 1000, per_item_ms, note))
        print(f"{phase:<34} {batch:>6} {seconds * 1000:>9.2f} {per_item_ms:>9.3f}  {note}", flush=True)

    def store(self, slots: int, compiled: bool, prefill_batch: int = 32, suffix_cap: int = 136, compile_decode: bool = False):
        from dvl_batch.config.spec import GenerationSpec
        from dvl_batch.engine.planning import Layout
        from dvl_batch.engine.slots import SlotStore

        eos = self.processor.tokenizer.eos_token_id
        return SlotStore(self.vlm, self.views, Layout(slots, 1, self.length, suffix_cap), GenerationSpec(max_new_tokens=128),
                         eos, eos, prefill_batch=prefill_batch, compile_steps=compiled, cuda_graphs=True,
                         compile_decode=compile_decode)

    # ------------------------------------------------------------ vision

    def vision(self) -> None:
        from dvl_batch.engine.vision_layers import engine_image_features

        for compiled in (False, True):
            encode = engine_image_features(self.vlm, True)  # the slot engine's image encoding
            fn = torch.compile(encode, dynamic=False) if compiled else encode
            for batch in (32, 64, 128):
                pixels = {"pixel_values": torch.randn(batch, 3, 384, 384, device=self.device, dtype=torch.bfloat16)}
                with torch.inference_mode():
                    t = timed(lambda fn=fn, pixels=pixels: fn(pixels))
                    mfu = self.flops.vision_per_image * batch / t / (PEAK_TFLOPS * 1e12)
                    self.row(f"vision {'compiled' if compiled else 'eager'}", batch, t, t / batch * 1000, f"MFU {mfu:.2f}")
                    if batch == 64:
                        self.results["tables"][f"vision_{compiled}"] = top_kernels(lambda fn=fn, pixels=pixels: fn(pixels))
            torch._dynamo.reset()

    # ------------------------------------------------------------ prefill

    def prefill(self) -> None:
        per_image = self.length * self.flops.llm_per_token + self.flops.attn_per_token_per_ctx * self.length**2 / 2
        for compiled in (False, True):
            for batch in self.args.prefill_batches:
                with torch.inference_mode():
                    store = self.store(batch, compiled, prefill_batch=batch)
                    prefixes = [list(self.prompt.input_ids)] * batch
                    feats = [torch.randn(1, 576, self.vlm.hidden_size, device=self.device, dtype=torch.bfloat16)] * batch

                    def run(store=store, prefixes=prefixes, feats=feats, batch=batch):
                        store.prefill_prefixes(prefixes, list(range(batch)), feats)

                    t = timed(run)
                    mfu = per_image * batch / t / (PEAK_TFLOPS * 1e12)
                    self.row(f"prefix prefill {'compiled' if compiled else 'eager'}", batch, t, t / batch * 1000, f"MFU {mfu:.2f}")
                    if batch == 32:
                        self.results["tables"][f"prefill_{compiled}"] = top_kernels(run)
                del store
                release_device_memory()
            torch._dynamo.reset()

    # ------------------------------------------------------------ matmul

    def matmul(self) -> None:
        m = 32 * self.length
        x = torch.randn(m, 2048, device=self.device, dtype=torch.bfloat16)
        shapes = {"q,k,v separate": [2048] * 3, "qkv fused": [6144], "gate,up separate": [5632] * 2,
                  "gate+up fused": [11264], "o": [2048]}
        for name, outs in shapes.items():
            weights = [torch.randn(n, 2048, device=self.device, dtype=torch.bfloat16) for n in outs]
            t = timed(lambda weights=weights: [torch.nn.functional.linear(x, w) for w in weights])
            flops = 2 * m * 2048 * sum(outs)
            self.row(f"matmul {name}", m, t, t * 1000, f"{flops / t / 1e12:.0f} TFLOP/s")
        down = torch.randn(2048, 5632, device=self.device, dtype=torch.bfloat16)
        h = torch.randn(m, 5632, device=self.device, dtype=torch.bfloat16)
        t = timed(lambda: torch.nn.functional.linear(h, down))
        self.row("matmul down", m, t, t * 1000, f"{2 * m * 2048 * 5632 / t / 1e12:.0f} TFLOP/s")

    # ------------------------------------------------------------ decode attention

    def attn(self) -> None:
        from dvl_batch.bench.device_time import copy_bandwidth
        from dvl_batch.engine.triton_decode import KernelConfig, choose_splits, decode_attention

        copy = copy_bandwidth(gib=2.0)
        self.results["copy_bandwidth_TBps"] = copy / 1e12
        print(f"device copy {copy / 1e12:.2f} TB/s", flush=True)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        for rows in (384, 768):
            self._attn_rows(rows, copy, decode_attention, KernelConfig, choose_splits(rows, 16, sms))
            release_device_memory()

    def attn_fp8(self) -> None:
        """The decode kernel over an fp8 cache (--kv-dtype fp8) at the caption layout that fits
        in memory with it (1651 rows on the H200), launch configurations swept like `attn`."""
        from dvl_batch.bench.device_time import copy_bandwidth
        from dvl_batch.engine.triton_decode import KernelConfig, choose_splits, decode_attention

        copy = copy_bandwidth(gib=2.0)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        rows = 1651
        self._attn_rows(rows, copy, decode_attention, KernelConfig, choose_splits(rows, 16, sms),
                        cache_dtype=torch.float8_e4m3fn)

    def _attn_rows(self, rows: int, copy: float, decode_attention, KernelConfig, base: int,
                   cache_dtype: torch.dtype = torch.bfloat16) -> None:
        heads, dim, plen, scap, mean_suffix = 16, 128, self.length, 136, 36
        fp8 = cache_dtype != torch.bfloat16
        pk = torch.randn(rows, heads, plen, dim, device=self.device, dtype=torch.bfloat16).to(cache_dtype)
        pv = torch.randn(rows, heads, plen, dim, device=self.device, dtype=torch.bfloat16).to(cache_dtype)
        sk = torch.randn(rows, heads, scap, dim, device=self.device, dtype=torch.bfloat16).to(cache_dtype)
        sv = torch.randn(rows, heads, scap, dim, device=self.device, dtype=torch.bfloat16).to(cache_dtype)
        q = torch.randn(rows, heads, dim, device=self.device, dtype=torch.bfloat16)
        plen_t = torch.full((rows,), plen, dtype=torch.long, device=self.device)
        rlen_t = torch.randint(0, 2 * mean_suffix, (rows,), device=self.device)
        moved = 2 * rows * heads * dim * cache_dtype.itemsize * (plen + mean_suffix)  # K and V actually read
        tag = " fp8" if fp8 else ""

        def run(splits, cfg=None):
            return decode_attention(q, pk, pv, sk, sv, plen_t, rlen_t, 1, dim**-0.5, splits, cfg)

        blocks, stages = ((64, 128, 256), (2, 3, 4)) if fp8 else ((64, 128), (2, 3))
        configs = [(s, KernelConfig(block_n=b, num_warps=w, num_stages=st))
                   for s in sorted({1, base, 2}) for b in blocks for w in (4, 8) for st in stages]
        if fp8:  # the CUDA-core prefix loop for one-row groups (no 16-row dot for one query), with
            # deeper pipelines and longer tiles too: a pure read needs more bytes in flight per SM
            # (read_bandwidth.py, 0i) than the 3.19 TB/s winner of 0c keeps
            configs += [(s, KernelConfig(block_n=b, num_warps=w, num_stages=st, fma_prefix=True))
                        for s in sorted({1, base, 2}) for b in (32, 64, 128, 256) for w in (2, 4, 8) for st in (2, 3, 4)]
        else:  # the fp8 winner's loop, on a bf16 cache
            configs += [(1, KernelConfig(block_n=b, num_warps=w, num_stages=2, fma_prefix=True))
                        for b in (64, 128) for w in (2, 4)]
        best = None
        for splits, cfg in configs:
            try:
                t = timed(lambda splits=splits, cfg=cfg: run(splits, cfg))
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is skipped
                print(f"  config {cfg} splits {splits}: {type(exc).__name__}", flush=True)
                continue
            if best is None or t < best[0]:
                best = (t, splits, cfg)
            sweep = self.results.setdefault("attn_sweep", [])
            sweep.append({"rows": rows, "splits": splits, "config": cfg.__dict__, "ms": t * 1000,
                          "TBps": moved / t / 1e12, "cache": str(cache_dtype)})
            print(f"  {moved / t / 1e12:.2f} TB/s splits {splits} {cfg}", flush=True)
            if len(sweep) % 8 == 0:  # a sweep cut short by a time limit keeps what it measured
                self.save(self.args.out)
        t, splits, cfg = best
        self.row(f"decode attn triton{tag} best", rows, t, t / rows * 1000,
                 f"{moved / t / 1e12:.2f} TB/s ({moved / t / copy:.0%} of copy) splits {splits} {cfg}")
        t = timed(lambda: run(base))
        self.row(f"decode attn triton{tag} default", rows, t, t / rows * 1000, f"{moved / t / 1e12:.2f} TB/s")
        if fp8:
            return
        for name, fn in self._sdpa_variants(q[:, :, None], pk, pv).items():
            try:
                t = timed(fn)
                prefix_bytes = 2 * rows * heads * dim * 2 * plen
                self.row(f"prefix attn {name}", rows, t, t / rows * 1000, f"{prefix_bytes / t / 1e12:.2f} TB/s")
            except Exception as exc:  # noqa: BLE001
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)

    def attn_live(self) -> None:
        """Decode attention as a caption run sees it: an 826-slot layout (the H200's bf16 caption
        layout) of which a bucket of rows is live, answers 0-127 tokens long. The whole-layout
        kernel behind a scatter/gather of the live rows' queries, against the kernel indexing
        the live slots itself (its grid only the bucket), at several prefix splits and tiles."""
        from dvl_batch.bench.device_time import copy_bandwidth
        from dvl_batch.engine.triton_decode import BF16_ONE_ROW_CONFIG, KernelConfig, choose_splits, decode_attention

        copy = copy_bandwidth(gib=2.0)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        slots, heads, dim, plen, scap = 826, 16, 128, self.length, 136
        dev, bf16 = self.device, torch.bfloat16
        pk, pv = (torch.randn(slots + 1, heads, plen, dim, device=dev, dtype=bf16) for _ in range(2))
        sk, sv = (torch.randn(slots + 1, heads, scap, dim, device=dev, dtype=bf16) for _ in range(2))
        configs = [BF16_ONE_ROW_CONFIG, KernelConfig(block_n=64), KernelConfig(block_n=128, num_warps=8),
                   KernelConfig(block_n=64, num_warps=4, num_stages=3), KernelConfig(block_n=128, num_warps=4, fma_prefix=True)]
        for live_rows in (128, 256, 384, 512, 640, 768, 826):
            live = torch.randperm(slots, device=dev)[:live_rows]
            plen_t = torch.zeros(slots + 1, dtype=torch.long, device=dev)
            plen_t[live] = plen
            rlen_t = torch.zeros(slots + 1, dtype=torch.long, device=dev)
            rlen_t[live] = torch.randint(0, 128, (live_rows,), device=dev)
            moved = 2 * heads * dim * 2 * (plen_t.sum().item() + (rlen_t[live] + 1).sum().item())
            q = torch.randn(live_rows, heads, dim, device=dev, dtype=bf16)
            whole_splits = choose_splits(slots, heads, sms)

            def whole(q=q, live=live, plen_t=plen_t, rlen_t=rlen_t, splits=whole_splits):
                full = q.new_zeros(slots + 1, heads, dim)
                full.index_copy_(0, live, q)
                out = decode_attention(full[:slots], pk[:slots], pv[:slots], sk, sv, plen_t, rlen_t, 1, dim**-0.5, splits)
                return out[live]

            t = timed(whole)
            self.row("decode attn whole layout + scatter", live_rows, t, t / live_rows * 1000,
                     f"{moved / t / 1e12:.2f} TB/s ({moved / t / copy:.0%} of copy) splits {whole_splits}")
            best = None
            for splits in sorted({1, 2, 4, choose_splits(live_rows, heads, sms)}):
                for cfg in configs:
                    def indexed(q=q, live=live, plen_t=plen_t, rlen_t=rlen_t, splits=splits, cfg=cfg):
                        return decode_attention(q, pk, pv, sk, sv, plen_t, rlen_t, 1, dim**-0.5, splits, cfg, live=live)
                    try:
                        t = timed(indexed)
                    except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is skipped
                        print(f"  {cfg} splits {splits}: {type(exc).__name__}", flush=True)
                        continue
                    self.results.setdefault("attn_live_sweep", []).append(
                        {"rows": live_rows, "splits": splits, "config": cfg.__dict__, "ms": t * 1000, "TBps": moved / t / 1e12})
                    print(f"  live {live_rows}: {moved / t / 1e12:.2f} TB/s splits {splits} {cfg}", flush=True)
                    if best is None or t < best[0]:
                        best = (t, splits, cfg)
            if best is None:
                continue
            t, splits, cfg = best
            self.row("decode attn indexed, best", live_rows, t, t / live_rows * 1000,
                     f"{moved / t / 1e12:.2f} TB/s ({moved / t / copy:.0%} of copy) splits {splits} {cfg}")
            self.save(self.args.out)

    @staticmethod
    def _sdpa_variants(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def with_backend(backend, bias=None):
            def run():
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return run

        def padding_bias(q, k):
            """What variable prefix lengths would need: -inf past each group's prefix (8 here)."""
            bias = torch.zeros(k.shape[0], 1, 1, k.shape[2], device=k.device, dtype=q.dtype)
            bias[..., -8:] = float("-inf")
            return bias

        variants = {
            "sdpa flash": with_backend(SDPBackend.FLASH_ATTENTION),
            "sdpa efficient": with_backend(SDPBackend.EFFICIENT_ATTENTION),
            "sdpa cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
            "sdpa cudnn, padding bias": with_backend(SDPBackend.CUDNN_ATTENTION, padding_bias(q, k)),
            "flash op +lse": lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v),
        }
        try:
            from torch.nn.attention.flex_attention import flex_attention

            compiled = torch.compile(flex_attention, dynamic=False)
            variants["flex"] = lambda: compiled(q, k, v)
        except ImportError:
            pass
        return variants

    # ------------------------------------------------------------ decode step

    def decode(self) -> None:
        """One whole decode step as a CUDA graph, eager forward and compiled forward (the
        slot engine's `compile_decode`), at several slot counts, with the top kernels."""
        weights = sum(p.numel() * p.element_size() for p in self.model.model.language_model.parameters())
        weights += self.model.lm_head.weight.numel() * self.model.lm_head.weight.element_size()
        for compiled in (False, True):
            for slots in (384, 640):  # (1024 slots of a 752-token layout do not fit in 141 GB)
                with torch.inference_mode():
                    started = time.perf_counter()
                    store = self.store(slots, compiled=False, compile_decode=compiled)
                    setup = time.perf_counter() - started
                    store.group_prefix.fill_(self.length)
                    store.row_prefix.fill_(self.length)
                    store.row_len.fill_(36)
                    store.decoder._every_row_live()  # the full bucket's rows in the graph's buffers
                    t = timed(store.decoder.graphs[store.decoder.rows].replay)
                    kv = 2 * 2 * self.vlm.num_layers * slots * self.vlm.num_kv_heads * self.vlm.head_dim * (self.length + 37)
                    name = "decode step graph" + (", compiled forward" if compiled else "")
                    self.row(name, slots, t, t / slots * 1000 * 72,
                             f"{(weights + kv) / t / 1e12:.2f} TB/s; ms/img at 72 steps; setup {setup:.1f} s")
                    if slots == 384:
                        store.row_len.fill_(36)
                        self.results["tables"][f"decode_{'compiled' if compiled else 'eager'}"] = top_kernels(
                            store.decoder.body_all, limit=25)
                del store
                release_device_memory()
            torch._dynamo.reset()

    def store_kv(self) -> None:
        """Writing one prefill batch's keys into the cache: indexed assignment vs index_copy_."""
        from dvl_batch.engine.attention import store_prefix

        batch, heads, dim = 32, 16, 128
        cache = torch.zeros(384, heads, self.length, dim, device=self.device, dtype=torch.bfloat16)
        key = torch.randn(batch, self.length, heads, dim, device=self.device, dtype=torch.bfloat16).transpose(1, 2)
        slots = torch.randperm(384, device=self.device)[:batch]
        moved = 2 * key.numel() * 2
        whole = key.contiguous()
        for name, fn in (("indexed assignment", lambda: cache.__setitem__((slots, slice(None), slice(None, self.length)), key)),
                         ("index_copy_ of bf16 elements", lambda: cache.index_copy_(0, slots, whole)),
                         ("store_prefix (8-byte words)", lambda: store_prefix(cache, slots, whole))):
            t = timed(fn)
            self.row(f"store prefix KV: {name}", batch, t, t / batch * 1000, f"{moved / t / 1e12:.2f} TB/s")

    def save(self, path: str) -> None:
        self.results["rows"] = [dict(zip(("phase", "batch", "ms", "ms_per_item", "note"), r, strict=True)) for r in self.rows]
        Path(path).write_text(json.dumps(self.results, indent=2))

    def write(self, path: str) -> None:
        self.save(path)
        for name, table in self.results["tables"].items():
            print(f"\n=== top kernels: {name}\n{table}")
        print(f"\n{'phase':<34} {'batch':>6} {'ms':>9} {'ms/item':>9}  note")
        for phase, batch, ms, per, note in self.rows:
            print(f"{phase:<34} {batch:>6} {ms:>9.2f} {per:>9.3f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--sections", default="attn,vision,prefill,matmul,store_kv,decode")
    parser.add_argument("--prefill-batches", default="16,32,64", type=lambda v: [int(b) for b in v.split(",")],
                        help="prefill section: images per prefix batch (each compiled batch size compiles once)")
    args = parser.parse_args()
    profiler = Profiler(args)
    print(f"vision attention implementation: {profiler.results['vision_attn']}", flush=True)
    for section in args.sections.split(","):
        try:
            getattr(profiler, section)()
        except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
            print(f"section {section} failed: {type(exc).__name__}: {exc}", flush=True)
        profiler.write(args.out)


if __name__ == "__main__":
    main()
