"""Device side of the slot engine: KV slots, per-row state, and the model steps.

`SlotStore` owns everything that lives on the device for a fixed layout (groups x
rows, prefix and suffix capacity) and runs the three kinds of forward passes:

- image encoding (vision tower + aligner), in fixed-size chunks;
- prefix prefill: whole prompts (one row per group) or the shared image prefix of a
  group, right-padded to the prefix capacity, in fixed-size batches;
- decode: one token for every live row (`decode_step.DecodeStep`), as CUDA graphs.

On CUDA the image encoder and the prefix pass are compiled with torch.compile
(fusing transformers' RMSNorm, rotary and MLP element-wise work) with shapes pinned,
so each compiles once. The compiled prefix pass returns its keys/values instead of
writing them into the multi-GB cache (an in-place write inside a compiled graph makes
the compiler copy the whole buffer); they are stored right after. The decode step's
forward is compiled too (`compile_decode`), its attention one opaque eager call, with the
live-row bucket as its dynamic size, and captured as CUDA graphs, one per bucket.

Nothing here waits for the device: inputs go up from pinned memory without blocking,
and tokens come back through pinned buffers with an event (`Launched`), which the
scheduler reads one launch later, so the device always has the next step queued.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..config.spec import GenerationSpec
from ..errors import UsageError
from ..preprocess.images import ImageView, normalize_pixels, view_constants
from .attention import AttentionStep, SlotKV, route_attention, scores_support_out_dtype, store_prefix, to_cache
from .decode_step import DecodeStep
from .fused_layers import fuse_projections
from .model import VisionLanguageModel
from .planning import Layout, starts_with
from .questions import QuestionPrefill
from .sampling import sample_top_p
from .types import Fusion, Launched
from .vision_layers import engine_image_features

NEG_INF = float("-inf")
NO_FORCE = 1 << 30
log = logging.getLogger(__name__)


class SlotStore:
    """KV slots + row state for one layout, and the forward passes that fill them."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        views: dict[str, ImageView],
        layout: Layout,
        generation: GenerationSpec,
        eos_id: int,
        pad_id: int,
        prefill_batch: int,
        compile_steps: bool,
        cuda_graphs: bool,
        use_triton: bool = True,
        stop_schedule: bool = False,
        kv_dtype: torch.dtype | None = None,
        compile_decode: bool | None = None,
        fusion: Fusion = Fusion(),
    ):
        route_attention(vlm.language_model)
        fuse_projections(vlm.language_model, fusion.projections)
        self.image_features = engine_image_features(vlm, fusion.vision_epilogue)
        self.vlm, self.views, self.layout, self.gen = vlm, views, layout, generation
        self.eos_id, self.pad_id, self.prefill_batch = eos_id, pad_id, prefill_batch
        self.device, self.dtype = vlm.device, vlm.dtype
        self.on_cuda = self.device.type == "cuda"
        self.stop_schedule = stop_schedule  # the bench's forced-EOS schedule; jobs never carry it in the graph
        self.generator = torch.Generator(device=self.device).manual_seed(generation.seed)
        self.scratch = layout.groups  # one spare group absorbs the padding rows of fixed-size prefills
        self.kv_dtype = kv_dtype or self.dtype  # fp8: keys/values stored in one byte, widened as they are read
        self.kv = SlotKV.allocate(  # one spare row past the layout: the decode step's padding
            vlm.num_layers, layout.groups + 1, layout.rows + 1, vlm.num_kv_heads, layout.prefix_cap, layout.suffix_cap,
            vlm.head_dim, self.kv_dtype, self.device, common_len=len(layout.common),
        )
        self.common_len = len(layout.common)  # positions of every group's prefix before its own tokens
        self._store_common()
        dev, rows = self.device, layout.rows + 1
        self.next_tok = torch.full((rows,), pad_id, dtype=torch.long, device=dev)
        self.row_len = torch.zeros(rows, dtype=torch.long, device=dev)
        self.row_prefix = torch.zeros(rows, dtype=torch.long, device=dev)
        self.n_gen = torch.zeros(rows, dtype=torch.long, device=dev)
        self.row_live = torch.zeros(rows, dtype=torch.long, device=dev)  # 1 while a row holds a request
        self.force_at = torch.full((rows,), NO_FORCE, dtype=torch.long, device=dev)
        self.group_prefix = torch.zeros(layout.groups + 1, dtype=torch.long, device=dev)
        self.prefix_range = torch.arange(self.common_len + layout.prefix_cap, device=dev)
        self.suffix_range = torch.arange(layout.suffix_cap, device=dev)
        self.out_dtype_scores = self.on_cuda and scores_support_out_dtype(self.device, self.dtype)
        self.triton_splits = _triton_splits(layout, vlm, self.device) if use_triton else 0
        if self.kv_dtype.itemsize == 1 and self.on_cuda and not self.triton_splits:
            # the torch path would widen a whole layer's cache at every layer of every step
            raise UsageError("--kv-dtype fp8 needs the Triton decode kernels (triton installed, no --no-triton-attention)")
        self.constants = {name: view_constants(view, dev) for name, view in views.items()}
        self.fixed_shapes = compile_steps and self.on_cuda
        self.prefix_fn = self._prefix_pass
        self.vision_fn = self.image_features
        self.decode_fn = self._decode_pass
        started = time.perf_counter()
        if self.fixed_shapes:
            self._compile()
        if self.on_cuda and (self.fixed_shapes if compile_decode is None else compile_decode):
            # the batch (the live-row bucket) is its dynamic size: it compiles at the first two
            # sizes of the graph capture's warm-ups (DecodeStep._first_run), then serves every bucket
            self.decode_fn = torch.compile(self._decode_pass)
        self.questions = QuestionPrefill(self, compiled=self.decode_fn != self._decode_pass and layout.rows_per_group > 1)
        self.questions.warm()
        self.compile_seconds = self._synced_since(started)
        started = time.perf_counter()
        self.decoder = DecodeStep(self, cuda_graphs)
        self.graph_seconds = self._synced_since(started) - self.decoder.compile_seconds
        self.compile_seconds += self.decoder.compile_seconds

    def _synced_since(self, started: float) -> float:
        """Wall seconds since `started`, once the device has finished what was queued."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    # ------------------------------------------------------------ compilation

    def _compile(self) -> None:
        """Compile the image and prefix passes and run each once, so compilation happens now."""
        try:
            # not autotuned: Inductor's matmul autotuning made the H200's prefix pass no faster
            # (2.70 against 2.69 ms per image, BENCHMARKS.md 0k) for a longer start
            self.prefix_fn = torch.compile(self._prefix_pass, dynamic=False)
            self.vision_fn = torch.compile(self.image_features, dynamic=False)
            self._warm_compiled()
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop the job
            log.warning("torch.compile failed (%s); running the slot engine eagerly", str(exc).splitlines()[0])
            self.prefix_fn, self.vision_fn = self._prefix_pass, self.image_features
            self.fixed_shapes = False
        self.reset_rows()

    def _warm_compiled(self) -> None:
        width, batch = self.layout.prefix_cap, self.prefill_batch
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long, device=self.device)
        slots = torch.full((batch,), self.scratch, dtype=torch.long, device=self.device)
        last = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._store_prefix_kv(slots, *self.prefix_fn(self.vlm.embed_tokens(ids), last))
        pixels = {v.name: torch.zeros(batch, 3, v.size, v.size, dtype=self.dtype, device=self.device) for v in self.views.values()}
        self.vision_fn(pixels)

    @torch.inference_mode()
    def _store_common(self) -> None:
        """Keys/values of the layout's common head (the system prompt), computed once, eagerly
        (one short pass): the prefix passes attend to them and store them in front of each
        group's own keys/values, so the head is never run again but decode reads one prefix."""
        if not self.common_len:
            return
        ids = torch.tensor([self.layout.common], dtype=torch.long, device=self.device)
        step = AttentionStep(None, "prefix", collect=[])  # plain causal: the head has nothing before it
        positions = torch.arange(self.common_len, device=self.device)[None]
        self.vlm.language_forward(self.vlm.embed_tokens(ids), positions, dvl_step=step)
        for layer, (key, value) in enumerate(step.collect):
            self.kv.common_k[layer].copy_(to_cache(key[0], self.kv_dtype))
            self.kv.common_v[layer].copy_(to_cache(value[0], self.kv_dtype))

    # ------------------------------------------------------------ uploads

    def upload(self, values, dtype=torch.long) -> torch.Tensor:
        """A host list as a device tensor, without waiting for the device (pinned, async)."""
        tensor = torch.tensor(values, dtype=dtype)
        return self._to_device(tensor)

    def _stack_for_upload(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The images of an admission in one tensor; on CUDA in pinned memory, so uploading
        its chunks copies them once (a plain cat and then pin_memory copied ~14 MB twice per
        32 images on the host)."""
        if not self.on_cuda or len({t.dtype for t in tensors}) > 1:  # (mixed types: cat promotes)
            return torch.cat(tensors)
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        return torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True))

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.on_cuda:
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------ images

    def encode_images(self, pixels_by_item: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[int, torch.Tensor]:
        """uid -> [n_images, tokens, hidden]; every image encoded once, in fixed-size chunks."""
        if not pixels_by_item:
            return {}
        names = list(pixels_by_item[0][1])
        stacked = {name: self._stack_for_upload([p[name] for _, p in pixels_by_item]) for name in names}
        total = stacked[names[0]].shape[0]
        chunk = self.prefill_batch if self.fixed_shapes else total
        outputs = []
        for start in range(0, total, chunk):
            part = {}
            for name in names:
                piece = self._to_device(stacked[name][start : start + chunk])
                if piece.dtype == torch.uint8:
                    piece = normalize_pixels(piece, self.views[name], self.dtype, self.constants[name])
                piece = piece.to(self.dtype)
                if self.fixed_shapes and piece.shape[0] < chunk:
                    pad = torch.zeros(chunk - piece.shape[0], *piece.shape[1:], dtype=piece.dtype, device=piece.device)
                    piece = torch.cat([piece, pad])
                part[name] = piece
            count = min(chunk, total - start)
            outputs.append(self.vision_fn(part)[:count])
        features = torch.cat(outputs)
        out, start = {}, 0
        for uid, pixels in pixels_by_item:
            count = pixels[names[0]].shape[0]
            out[uid] = features[start : start + count]
            start += count
        return out

    # ------------------------------------------------------------ prefill

    def _prefix_pass(self, embeds: torch.Tensor, last: torch.Tensor):
        """Causal pass over right-padded prefixes after the common head (whose stored keys/values
        the attention reads): (last-token logits, per-layer keys and values, the head's in front)."""
        positions = torch.arange(self.common_len, self.common_len + embeds.shape[1], device=embeds.device)
        positions = positions[None].expand(embeds.shape[0], -1)
        step = AttentionStep(self.kv, "prefix", collect=[])
        hidden = self.vlm.language_forward(embeds, positions, dvl_step=step)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # contiguous [B, H, T, D]: the compiled graph writes them in the cache's layout, so
        # storing them is a copy of whole group blocks (strided views copied at ~1 TB/s)
        keys = [to_cache(k, self.kv_dtype).contiguous() for k, _ in step.collect]
        values = [to_cache(v, self.kv_dtype).contiguous() for _, v in step.collect]
        return self.vlm.lm_head(picked).float(), keys, values

    def _decode_pass(self, tokens: torch.Tensor, positions: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        """Float logits of one new token per row ([B, 1] tokens at [B, 1] positions).

        Compiled (with `compile_decode`), the attention call stays one opaque eager piece
        (`attention._rows_step`) and inductor fuses the element-wise work around it
        (RMSNorm, rotary, SiLU, residual adds): in eager mode those are ~40 small kernels
        per layer, about a quarter of a 384-row step besides attention (profile_engine.py).
        """
        hidden = self.vlm.language_forward(self.vlm.embed_tokens(tokens), positions, dvl_step=step)
        return self.vlm.lm_head(hidden[:, -1]).float()

    def _store_prefix_kv(self, slots: torch.Tensor, logits, keys, values) -> torch.Tensor:
        for layer, (key, value) in enumerate(zip(keys, values, strict=True)):
            store_prefix(self.kv.prefix_k[layer], slots, key)
            store_prefix(self.kv.prefix_v[layer], slots, value)
        return logits

    def prefill_prefixes(self, prefixes: list[list[int]], slots: list[int], features: list[torch.Tensor]):
        """Store the KV of new groups' prefixes; returns first-token logits (meaningful when
        the prefixes are whole prompts). `arm_groups` makes them readable. Batches of `prefill_batch`, padded to fixed shapes
        when compiled (padding rows write into the scratch group). Each prefix starts with the
        layout's common head (the scheduler admits no other); only the rest is run, and the
        slot stores the head's keys/values in front of it."""
        head = self.layout.common
        if not all(starts_with(p, head) for p in prefixes):
            raise ValueError("a prefix that does not start with the layout's common head was admitted")
        prefixes = [p[len(head) :] for p in prefixes]
        logits = []
        chunk = self.prefill_batch if self.fixed_shapes else len(prefixes)
        for start in range(0, len(prefixes), chunk):
            part = prefixes[start : start + chunk]
            part_slots = slots[start : start + chunk]
            part_feats = [f for f in features[start : start + chunk] if f is not None]
            logits.append(self._prefill_chunk(part, part_slots, part_feats, chunk)[: len(part)])
        return torch.cat(logits)

    def _prefill_chunk(self, prefixes, slots, features, batch) -> torch.Tensor:
        """One prefill batch. The padded ids and the image-token positions are built with
        numpy: the Python lists they replace took ~7 ms of host time per 32 prompts of 616
        tokens (0.4 ms now), time the host needs for launching the device's next work."""
        width = self.layout.prefix_cap if self.fixed_shapes else max(len(p) for p in prefixes)
        count = batch if self.fixed_shapes else len(prefixes)
        ids = np.full((count, width), self.pad_id, dtype=np.int64)
        for r, prefix in enumerate(prefixes):
            ids[r, : len(prefix)] = prefix
        embeds = self.vlm.embed_tokens(self._to_device(torch.from_numpy(ids)))
        if features:
            positions = np.flatnonzero(ids == self.vlm.image_token_id)
            flat = torch.cat([f.reshape(-1, embeds.shape[-1]) for f in features]).to(embeds.dtype)
            embeds = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, self._to_device(torch.from_numpy(positions)), flat)
            embeds = embeds.view(count, width, -1)
        slot_t = self.upload(slots + [self.scratch] * (count - len(slots)))
        last = self.upload([max(len(p), 1) - 1 for p in prefixes] + [0] * (count - len(prefixes)))
        return self._store_prefix_kv(slot_t, *self.prefix_fn(embeds, last))

    def arm_groups(self, slots: list[int], prefix_lengths: list[int]) -> None:
        """Give prefilled groups their prefix lengths (head included), which decode and the
        question prefill read; set on the decode stream when the prefill ran on another, so
        that it lands after the `release` of the slots' previous groups."""
        self.group_prefix[self.upload(slots)] = self.upload(prefix_lengths)

    def start_whole_prompt_rows(self, slots: list[int]) -> torch.Tensor:
        """Rows whose whole prompt is the prefix: nothing stored per row yet."""
        rows_t = self.upload(slots) * self.layout.rows_per_group
        self.row_len.index_fill_(0, rows_t, 0)  # (tensor[idx] = 0 would copy a scalar up and wait)
        self.row_prefix[rows_t] = self.group_prefix[rows_t // self.layout.rows_per_group]
        return rows_t

    def prefill_suffixes(self, suffixes: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's question tokens against its group's prefix; (first-token logits, rows)."""
        return self.questions(suffixes, slots)

    def start_rows(self, rows_t: torch.Tensor, logits: torch.Tensor, force: list[int], rows: dict) -> Launched:
        """Pick every new row's first token and arm its state; the tokens come back later."""
        force_t = self.upload(force) if self.stop_schedule else None
        first = self.pick(logits, force_t)
        self.next_tok[rows_t] = first
        self.n_gen.index_fill_(0, rows_t, 1)
        self.row_live.index_fill_(0, rows_t, 1)
        if force_t is not None:
            self.force_at[rows_t] = force_t
        return self.send_home(first, rows)

    def send_home(self, tokens: torch.Tensor, rows: dict) -> Launched:
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=self.on_cuda)
        host.copy_(tokens, non_blocking=self.on_cuda)
        done = None
        if self.on_cuda:
            done = torch.cuda.Event()
            done.record()
        return Launched(host, done, rows)

    def prefix_bias(self, prefix_len: torch.Tensor) -> torch.Tensor:
        valid = self.prefix_range[None, :] < prefix_len[:, None]
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=self.device).masked_fill(~valid, NEG_INF)
        return bias[:, None, None, :]

    # ------------------------------------------------------------ decode

    def pick(self, logits: torch.Tensor, force_at: torch.Tensor | None = None, generated: torch.Tensor | int = 0) -> torch.Tensor:
        """Greedy or temperature/top-p sampling, then the forced-EOS schedule when `force_at`
        is given (with `stop_schedule`); `generated` tokens so far (0 for a row's first)."""
        if self.gen.temperature <= 0:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = sample_top_p(logits, self.gen.temperature, self.gen.top_p, self.generator)
        if force_at is None:
            return chosen
        forced = (generated + 1) == force_at
        return torch.where(forced, torch.full_like(chosen, self.eos_id), chosen)

    def release(self, groups: list[int], rows: list[int]) -> None:
        """Mark finished rows and freed groups empty on the device, so decode attention reads
        none of their keys.

        Slots stay in the fixed-shape decode step until they are refilled; a finished row's
        suffix length is held at zero (a VQA group keeps decoding its other questions), and
        a freed group's prefix length is zero, so the kernels skip them (masked loads move
        no data) instead of re-reading dead prompts at every step. Enqueued in stream order,
        so a later admission into the same slot wins.
        """
        if rows:
            rows_t = self.upload(rows)
            self.row_len.index_fill_(0, rows_t, 0)
            self.row_live.index_fill_(0, rows_t, 0)
        if groups:
            self.group_prefix.index_fill_(0, self.upload(groups), 0)

    def reset_rows(self) -> None:
        self.row_len.zero_()
        self.n_gen.zero_()
        self.group_prefix.zero_()
        self.row_live.zero_()

    def launch_decode(self, rows: dict) -> Launched:
        """Enqueue one decode step; its tokens can be read later without stalling the device."""
        return self.decoder.launch(rows)


def _triton_splits(layout: Layout, vlm: VisionLanguageModel, device: torch.device) -> int:
    """Prefix splits for the Triton decode kernels, or 0 where they cannot run."""
    if device.type != "cuda":
        return 0
    try:
        from .triton_decode import choose_splits
    except ImportError:
        return 0
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return choose_splits(layout.groups, vlm.num_heads, sm_count)
