"""The slot engine: continuous batching over a fixed-shape two-level KV cache.

transformers' `generate` runs a batch until its longest answer ends, so with varied
caption lengths most rows idle. Here every row is a slot: when an answer ends, its
slot is refilled with the next request on the following admission, while the other
rows keep decoding. Shapes never change between steps, so on CUDA the decode step
(embedding, all layers, LM head, greedy pick) is captured once as a CUDA graph.

Work per admission: encode the new images once (vision tower + aligner), prefill
each image prefix once per group, then prefill every question's suffix against the
shared prefix. Work per decode step: one token for every slot.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..images import ImageView, normalize_pixels
from ..spec import BatchSpec, GenerationSpec
from .attention import AttentionStep, SlotKV, route_attention
from .model import VisionLanguageModel
from .types import Completion, EnginePrompt, EngineStats, WorkItem

NEG_INF = float("-inf")
NO_FORCE = 1 << 30


@dataclass
class _Group:
    """Prompts of one item that share an identical image prefix (at most Q of them)."""

    item: WorkItem
    prefix: list[int]
    prompts: list[EnginePrompt]

    @property
    def suffix_lens(self) -> list[int]:
        return [len(p.input_ids) - len(self.prefix) for p in self.prompts]


@dataclass
class _Layout:
    groups: int
    rows_per_group: int
    prefix_cap: int
    suffix_cap: int

    @property
    def rows(self) -> int:
        return self.groups * self.rows_per_group


@dataclass
class _Row:
    uid: int
    index: int
    prompt_tokens: int
    max_new: int
    tokens: list[int] = field(default_factory=list)


def plan_groups(item: WorkItem, rows_per_group: int) -> list[_Group]:
    """Split an item's prompts into groups that share one prefix, Q prompts at most.

    With one row per group (captioning) the whole prompt is the prefix: one prefill
    pass yields the first token. With several, the prefix ends at the last image
    token and each question is a suffix prefilled against it.
    """
    if rows_per_group == 1:
        return [_Group(item, list(p.input_ids), [p]) for p in item.prompts]
    by_prefix: dict[tuple[int, ...], list[EnginePrompt]] = {}
    for prompt in item.prompts:
        prefix_len = min(prompt.prefix_len, len(prompt.input_ids) - 1)  # keep >= 1 suffix token
        by_prefix.setdefault(tuple(prompt.input_ids[:prefix_len]), []).append(prompt)
    groups = []
    for prefix, prompts in by_prefix.items():
        for start in range(0, len(prompts), rows_per_group):
            groups.append(_Group(item, list(prefix), prompts[start : start + rows_per_group]))
    return groups


class SlotEngine:
    """Continuous-batching generation for DeepSeek-VL with transformers' own modules."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        views: list[ImageView],
        generation: GenerationSpec,
        batch: BatchSpec,
        eos_token_ids: list[int],
        pad_token_id: int,
        kv_memory_fraction: float = 0.90,
    ):
        self.vlm = vlm
        self.views = {v.name: v for v in views}
        self.gen = generation
        self.batch = batch
        self.eos_ids = list(eos_token_ids)
        self.pad_id = pad_token_id
        self.kv_memory_fraction = kv_memory_fraction
        self.device = vlm.device
        self.dtype = vlm.dtype
        self.stats = EngineStats()
        self.use_graphs = batch.cuda_graphs and self.device.type == "cuda"
        self.generator = torch.Generator(device=self.device).manual_seed(generation.seed)
        self.layout: _Layout | None = None
        self.kv: SlotKV | None = None
        self.pending: deque[_Group] = deque()
        self.unplanned: list[WorkItem] = []  # items pulled before the layout (and so Q) is known
        self.deferred: deque[_Group] = deque()
        self.rows: dict[int, _Row] = {}
        self.free_groups: list[int] = []
        self.group_live: dict[int, int] = {}
        self.graph = None
        self.rows_per_group = 1
        route_attention(vlm.language_model)

    # ------------------------------------------------------------ sizing

    def _prefill_batch(self) -> int:
        if self.batch.prefill_batch:
            return self.batch.prefill_batch
        return 32 if self.device.type == "cuda" else 4

    def _layout_for(self, groups: list[_Group]) -> _Layout:
        prefix_cap = max(len(g.prefix) for g in groups)
        suffix_cap = max(max(g.suffix_lens) for g in groups) + self.gen.max_new_tokens
        suffix_cap = -(-suffix_cap // 8) * 8
        q = self.rows_per_group
        if self.batch.batch_size:
            n_groups = max(1, self.batch.batch_size // q)
        elif self.device.type == "cuda":
            n_groups = self._groups_from_memory(prefix_cap, suffix_cap, q)
        else:
            n_groups = 8
        return _Layout(n_groups, q, prefix_cap, suffix_cap)

    def _groups_from_memory(self, prefix_cap: int, suffix_cap: int, q: int) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        reserve = 6 * 2**30 + self._prefill_batch() * prefix_cap * self.vlm.hidden_size * 64
        per_group = SlotKV.bytes_per_group(
            self.vlm.num_layers, self.vlm.num_kv_heads, self.vlm.head_dim, prefix_cap, q, suffix_cap,
            torch.finfo(self.dtype).bits // 8,
        )
        budget = max(0, (free - reserve)) * self.kv_memory_fraction
        return int(max(1, min(1024 // q, budget // per_group)))

    def close(self) -> None:
        """Free the KV cache and the captured graph (the engine can be used again later)."""
        self._release()
        self.layout = None

    def _release(self) -> None:
        self.kv = None
        self.graph = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _allocate(self, layout: _Layout) -> None:
        v = self.vlm
        self.kv = SlotKV.allocate(
            v.num_layers, layout.groups, layout.rows, v.num_kv_heads, layout.prefix_cap, layout.suffix_cap,
            v.head_dim, self.dtype, self.device,
        )
        self.layout = layout
        self.stats.slots = layout.rows
        dev, rows = self.device, layout.rows
        self.next_tok = torch.full((rows,), self.pad_id, dtype=torch.long, device=dev)
        self.row_len = torch.zeros(rows, dtype=torch.long, device=dev)
        self.row_prefix = torch.zeros(rows, dtype=torch.long, device=dev)
        self.n_gen = torch.zeros(rows, dtype=torch.long, device=dev)
        self.force_at = torch.full((rows,), NO_FORCE, dtype=torch.long, device=dev)
        self.group_prefix = torch.zeros(layout.groups, dtype=torch.long, device=dev)
        self.prefix_range = torch.arange(layout.prefix_cap, device=dev)
        self.suffix_range = torch.arange(layout.suffix_cap, device=dev)
        self.free_groups = list(range(layout.groups - 1, -1, -1))
        self.group_live = {}
        self.rows = {}
        if self.use_graphs:
            self._capture_decode_graph()

    # ------------------------------------------------------------ model steps

    def _image_features(self, items: list[WorkItem]) -> dict[int, torch.Tensor]:
        """Encode every image of these items once: uid -> [n_images, tokens, hidden]."""
        with_images = [it for it in items if it.pixels]
        if not with_images:
            return {}
        batch: dict[str, torch.Tensor] = {}
        for name in with_images[0].pixels:
            stacked = torch.cat([it.pixels[name] for it in with_images]).to(self.device, non_blocking=True)
            if stacked.dtype == torch.uint8:
                stacked = normalize_pixels(stacked, self.views[name], self.dtype)
            batch[name] = stacked.to(self.dtype)
        features = self.vlm.image_features(batch)
        out, start = {}, 0
        for it in with_images:
            count = next(iter(it.pixels.values())).shape[0]
            out[it.uid] = features[start : start + count]
            start += count
        return out

    def _prefill_prefixes(
        self, groups: list[_Group], slots: list[int], features: dict[int, torch.Tensor]
    ) -> torch.Tensor | None:
        """Store the prefix keys/values of new groups in one right-padded causal pass.

        Right padding needs no mask: causal attention never lets a real token see the
        padding after it, and padded positions are masked later by `group_prefix`.
        Returns first-token logits when the prefixes are whole prompts (one row per group).
        """
        dev = self.device
        lengths = [len(g.prefix) for g in groups]
        width = max(lengths)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        self.group_prefix[slot_t] = torch.tensor(lengths, dtype=torch.long, device=dev)
        if width == 0:
            return None
        ids = torch.tensor([g.prefix + [self.pad_id] * (width - len(g.prefix)) for g in groups], dtype=torch.long, device=dev)
        embeds = self.vlm.embed_tokens(ids)
        image_mask = ids == self.vlm.image_token_id
        if features:
            feats = torch.cat([features[g.item.uid].reshape(-1, embeds.shape[-1]) for g in groups if g.item.uid in features])
            embeds = embeds.masked_scatter(image_mask[..., None], feats.to(embeds.dtype))
        positions = torch.arange(width, device=dev)[None].expand(len(groups), -1)
        hidden = self.vlm.language_forward(embeds, positions, dvl_step=AttentionStep(self.kv, "prefix", groups=slot_t))
        if self.layout.rows_per_group > 1:
            return None
        last = hidden[torch.arange(len(groups), device=dev), torch.tensor(lengths, device=dev) - 1]
        q = self.layout.rows_per_group
        rows_t = slot_t * q
        self.row_len[rows_t] = 0
        self.row_prefix[rows_t] = self.group_prefix[slot_t]
        return self.vlm.lm_head(last).float()

    def _prefill_suffixes(self, groups: list[_Group], slots: list[int]) -> torch.Tensor:
        """Run every row's suffix against its group's prefix; returns first-token logits [rows]."""
        q = self.layout.rows_per_group
        lengths, ids = [], []
        for group in groups:
            for j in range(q):
                if j < len(group.prompts):
                    suffix = group.prompts[j].input_ids[len(group.prefix) :]
                else:
                    suffix = [self.pad_id]
                lengths.append(len(suffix))
                ids.append(suffix)
        width = max(lengths)
        dev = self.device
        ids_t = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in ids], dtype=torch.long, device=dev)
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=dev)
        group_t = torch.tensor(slots, dtype=torch.long, device=dev)
        rows_t = (group_t[:, None] * q + torch.arange(q, device=dev)[None]).reshape(-1)
        prefix_len = self.group_prefix[group_t]
        offsets = torch.arange(width, device=dev)
        positions = prefix_len.repeat_interleave(q)[:, None] + offsets[None]
        prefix_bias = self._prefix_bias(prefix_len)
        causal = self.suffix_range[None, :] <= offsets[:, None]  # [T, Ls]
        suffix_bias = torch.zeros(width, self.layout.suffix_cap, dtype=torch.float32, device=dev)
        suffix_bias = suffix_bias.masked_fill(~causal, NEG_INF)[None, None].expand(len(ids), 1, -1, -1)
        step = AttentionStep(
            self.kv, "rows", groups=group_t, rows=rows_t, rows_per_group=q,
            write_pos=torch.zeros(len(ids), dtype=torch.long, device=dev),
            prefix_bias=prefix_bias, suffix_bias=suffix_bias,
        )
        hidden = self.vlm.language_forward(self.vlm.embed_tokens(ids_t), positions, dvl_step=step)
        last = hidden[torch.arange(len(ids), device=dev), lengths_t - 1]
        self.row_len[rows_t] = lengths_t
        self.row_prefix[rows_t] = prefix_len.repeat_interleave(q)
        return self.vlm.lm_head(last).float()

    def _prefix_bias(self, prefix_len: torch.Tensor) -> torch.Tensor:
        valid = self.prefix_range[None, :] < prefix_len[:, None]
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=self.device).masked_fill(~valid, NEG_INF)
        return bias[:, None, None, :]

    def _decode_forward(self) -> torch.Tensor:
        """One token for every slot; returns logits [rows, vocab] (float32)."""
        q = self.layout.rows_per_group
        positions = (self.row_prefix + self.row_len)[:, None]
        valid = self.suffix_range[None, :] <= self.row_len[:, None]
        suffix_bias = torch.zeros(valid.shape, dtype=torch.float32, device=self.device).masked_fill(~valid, NEG_INF)
        step = AttentionStep(
            self.kv, "rows", rows_per_group=q, write_pos=self.row_len,
            prefix_bias=self._prefix_bias(self.group_prefix), suffix_bias=suffix_bias[:, None, None, :],
        )
        hidden = self.vlm.language_forward(self.vlm.embed_tokens(self.next_tok[:, None]), positions, dvl_step=step)
        return self.vlm.lm_head(hidden[:, -1]).float()

    def _pick(self, logits: torch.Tensor, n_generated: torch.Tensor, force_at: torch.Tensor) -> torch.Tensor:
        """Greedy or temperature/top-p sampling, then the forced-EOS schedule."""
        if self.gen.temperature <= 0:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = sample_top_p(logits, self.gen.temperature, self.gen.top_p, self.generator)
        forced = (n_generated + 1) == force_at
        return torch.where(forced, torch.full_like(chosen, self.eos_ids[0]), chosen)

    def _decode_step_body(self) -> None:
        logits = self._decode_forward()
        self.step_logits = logits
        if self.gen.temperature <= 0:
            self.step_tokens = self._pick(logits, self.n_gen, self.force_at)

    def _capture_decode_graph(self) -> None:
        """Warm up, then capture the decode step; the slot state is reset afterwards."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step_body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._decode_step_body()
        self.graph = graph
        self.row_len.zero_()
        self.n_gen.zero_()

    # ------------------------------------------------------------ scheduling

    @torch.inference_mode()
    def _admit(self, groups: list[_Group]) -> list[Completion]:
        """Prefill new groups into free slots; OOM splits the batch and retries."""
        slots = [self.free_groups.pop() for _ in groups]
        try:
            started = time.perf_counter()
            features = self._image_features(list({id(g.item): g.item for g in groups}.values()))
            logits = self._prefill_prefixes(groups, slots, features)
            if logits is None:
                logits = self._prefill_suffixes(groups, slots)
            done = self._start_rows(groups, slots, logits)
            self._sync()
            self.stats.prefill_seconds += time.perf_counter() - started
            self.stats.prefill_calls += 1
            return done
        except torch.OutOfMemoryError:
            self.free_groups.extend(reversed(slots))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.stats.oom_splits += 1
            if len(groups) == 1:
                return [self._error(p, g, "out of memory on the device during prefill") for g in groups for p in g.prompts]
            half = len(groups) // 2
            return self._admit(groups[:half]) + self._admit(groups[half:])

    def _start_rows(self, groups: list[_Group], slots: list[int], logits: torch.Tensor) -> list[Completion]:
        q = self.layout.rows_per_group
        force = [
            (g.prompts[j].force_eos_after or NO_FORCE) if j < len(g.prompts) else NO_FORCE
            for g in groups
            for j in range(q)
        ]
        rows_t = torch.tensor([s * q + j for s in slots for j in range(q)], dtype=torch.long, device=self.device)
        force_t = torch.tensor(force, dtype=torch.long, device=self.device)
        first = self._pick(logits, torch.zeros_like(force_t), force_t)
        self.next_tok[rows_t] = first
        self.n_gen[rows_t] = 1
        self.force_at[rows_t] = force_t
        first_host = first.tolist()
        done: list[Completion] = []
        for gi, (group, slot) in enumerate(zip(groups, slots)):
            self.group_live[slot] = len(group.prompts)
            for j, prompt in enumerate(group.prompts):
                row = _Row(group.item.uid, prompt.index, len(prompt.input_ids), self.gen.max_new_tokens)
                self.rows[slot * q + j] = row
                finished = self._append(slot * q + j, row, first_host[gi * q + j])
                if finished:
                    done.append(finished)
        return done

    def _append(self, row_id: int, row: _Row, token: int) -> Completion | None:
        row.tokens.append(token)
        if token in self.eos_ids:
            reason = "stop"
        elif len(row.tokens) >= row.max_new:
            reason = "length"
        else:
            return None
        del self.rows[row_id]
        slot = row_id // self.layout.rows_per_group
        self.group_live[slot] -= 1
        if self.group_live[slot] == 0:
            del self.group_live[slot]
            self.free_groups.append(slot)
        self.stats.generated_tokens += len(row.tokens)
        return Completion(row.uid, row.index, row.tokens, reason, row.prompt_tokens)

    @torch.inference_mode()
    def _decode(self) -> list[Completion]:
        started = time.perf_counter()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._decode_step_body()
        tokens = self.step_tokens if self.gen.temperature <= 0 else self._pick(self.step_logits, self.n_gen, self.force_at)
        self.next_tok.copy_(tokens)
        self.row_len.add_(1).clamp_(max=self.layout.suffix_cap - 1)
        self.n_gen.add_(1)
        host = tokens.tolist()
        done = [c for r in list(self.rows) if (c := self._append(r, self.rows[r], host[r])) is not None]
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.decode_steps += 1
        return done

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _error(self, prompt: EnginePrompt, group: _Group, message: str) -> Completion:
        return Completion(group.item.uid, prompt.index, [], "error", len(prompt.input_ids), error=message)

    def _fits(self, group: _Group) -> bool:
        layout = self.layout
        return len(group.prefix) <= layout.prefix_cap and max(group.suffix_lens) + self.gen.max_new_tokens <= layout.suffix_cap

    def _too_long(self, group: _Group) -> bool:
        return len(group.prefix) + max(group.suffix_lens) + self.gen.max_new_tokens > self.vlm.max_positions

    # ------------------------------------------------------------ main loop

    def run(self, items: Iterator[WorkItem]) -> Iterator[Completion]:
        source = iter(items)
        exhausted = False
        while True:
            exhausted = self._pull(source, exhausted)
            for item in self.unplanned:
                self.pending.extend(plan_groups(item, self.rows_per_group))
            self.unplanned.clear()
            yield from self._reject_too_long()
            if self.layout is None or (not self.rows and self.deferred and not self.pending):
                if not self._reallocate():
                    if exhausted:
                        return
                    continue
            yield from self._admit_ready(exhausted)
            if self.rows:
                yield from self._decode()
            elif exhausted and not self.pending and not self.deferred:
                return

    def _wanted(self) -> int:
        """How many groups to have queued before the next admission."""
        if self.layout is None:
            return 2 * self._prefill_batch()
        return max(len(self.free_groups), 1) if not self.deferred else 0

    def _pull(self, source, exhausted: bool) -> bool:
        started = time.perf_counter()
        while not exhausted and len(self.pending) + len(self.unplanned) < self._wanted():
            if self.rows and len(self.free_groups) < self._admit_threshold():
                break
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                break
            if self.layout is None:
                self.rows_per_group = max(self.rows_per_group, len(item.prompts))
                self.unplanned.append(item)
            else:
                self.pending.extend(plan_groups(item, self.layout.rows_per_group))
        if not self.rows:
            self.stats.idle_seconds += time.perf_counter() - started
        return exhausted

    def _reject_too_long(self) -> Iterator[Completion]:
        kept: deque[_Group] = deque()
        for group in self.pending:
            if self._too_long(group):
                message = f"prompt plus max_new_tokens exceeds the model's {self.vlm.max_positions} positions"
                yield from (self._error(p, group, message) for p in group.prompts)
            else:
                kept.append(group)
        self.pending = kept

    @torch.inference_mode()
    def _reallocate(self) -> bool:
        waiting = list(self.deferred) + list(self.pending)
        if not waiting:
            return False
        previous = self.layout
        self._release()
        layout = self._layout_for(waiting)
        if previous is not None:  # capacity only grows, so earlier prompts keep fitting
            layout.prefix_cap = max(layout.prefix_cap, previous.prefix_cap)
            layout.suffix_cap = max(layout.suffix_cap, previous.suffix_cap)
        self._allocate(layout)
        self.pending = deque(list(self.deferred) + list(self.pending))
        self.deferred.clear()
        return True

    def _admit_threshold(self) -> int:
        return max(1, min(self._prefill_batch(), self.layout.groups // 8)) if self.layout else 1

    def _admit_ready(self, exhausted: bool) -> Iterator[Completion]:
        while self.pending and self.free_groups:
            if self.rows and len(self.free_groups) < self._admit_threshold() and not exhausted:
                return
            take: list[_Group] = []
            while self.pending and len(take) < min(self._prefill_batch(), len(self.free_groups)):
                group = self.pending.popleft()
                if len(group.prompts) > self.layout.rows_per_group or not self._fits(group):
                    self.deferred.append(group)
                else:
                    take.append(group)
            if not take:
                return
            yield from self._admit(take)


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Temperature then nucleus sampling, as transformers' warpers order them."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        drop = cumulative - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
