"""The slot engine: continuous batching over a fixed-shape two-level KV cache.

transformers' `generate` runs a batch until its longest answer ends, so with varied
caption lengths most rows idle. Here every answer is a row in a slot: when it ends,
the slot is refilled at the next admission while the other rows keep decoding.
Shapes never change between steps, so on CUDA the decode step is compiled and
captured once as a CUDA graph (see `slots.SlotStore`, which owns the device side).

This module is the scheduler: it plans work items into groups (one image prefix, up to
Q questions, after the head all prompts share), sizes the layout, decides when to admit,
and turns tokens into completions. Per admission: encode the new images once, prefill each
image prefix once (beside the decode steps with `overlap_prefill`, see `overlap.py`), then
each question's suffix against it. Per step: one token per row.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Iterator

import torch

from ..config.spec import BatchSpec, GenerationSpec
from ..preprocess.images import ImageView
from .attention import SlotKV, route_attention
from .device_clock import DeviceClock, phase
from .model import VisionLanguageModel
from .overlap import Admission, PrefillStream
from .planning import Group, Layout, PhaseClock, Row, common_head, plan_groups, split_too_long, starts_with
from .sizing import groups_that_fit, prefill_peak_bytes
from .slots import NO_FORCE, SlotStore
from .types import Completion, EnginePrompt, EngineStats, Fusion, Launched, WorkItem

# Most rows one decode step carries. Past ~1000 rows its matmuls are compute-bound and its fixed
# costs spread thin; the cap matters where memory allows more: VQA groups, fp8 KV caches.
MAX_DECODE_ROWS = 2048


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
        kv_dtype: torch.dtype | None = None,
        common_head: bool = True,
    ):
        self.vlm = vlm
        self.common_head = common_head  # compute the prompts' shared head (system prompt) once
        self.views = {v.name: v for v in views}
        self.gen = generation
        self.batch = batch
        self.eos_ids = list(eos_token_ids)
        self.pad_id = pad_token_id
        self.kv_memory_fraction = kv_memory_fraction
        self.kv_dtype = kv_dtype or vlm.dtype  # the KV slots' element type (fp8 halves them)
        self.device = vlm.device
        self.stats = EngineStats()
        self.store: SlotStore | None = None
        self.layout: Layout | None = None
        self.pending: deque[Group] = deque()
        self.unplanned: list[WorkItem] = []  # items pulled before the layout (and so Q) is known
        self.deferred: deque[Group] = deque()  # groups that need a larger layout
        self.rows: dict[int, Row] = {}
        self.free_groups: list[int] = []
        self.freed: list[int] = []  # groups freed since the last decode launch (reset on the device)
        self.finished_rows: list[int] = []  # rows whose answer ended since then
        self.group_live: dict[int, int] = {}
        self.launched: deque[Launched] = deque()  # token batches in flight, read in launch order
        self.rows_per_group = 1
        self.prefill_batch_limit: int | None = None  # set when a measured prefill batch would not fit
        self.prefills = PrefillStream(self.device, batch.overlap_prefill)  # admissions whose rows have not started
        self.device_clock: DeviceClock | None = None  # set by the bench: device time per phase
        # Set by the bench before the first run: prompts carry a forced-EOS schedule
        # (EnginePrompt.force_eos_after), so the captured decode step applies it. A job's
        # step has no such work in it.
        self.stop_schedule = False
        route_attention(vlm.language_model)

    def _prefill_batch(self) -> int:
        if self.prefill_batch_limit:
            return self.prefill_batch_limit
        if self.batch.prefill_batch:
            return self.batch.prefill_batch
        return 32 if self.device.type == "cuda" else 4

    def _layout_for(self, groups: list[Group], previous: Layout | None = None) -> Layout:
        prefixes = [g.prefix for g in groups]
        common = common_head(prefixes, self.vlm.image_token_id, previous and previous.common) if self.common_head else ()
        prefix_cap = max(map(len, prefixes)) - len(common)
        if previous is not None:  # capacity only grows, so earlier prompts keep fitting
            prefix_cap = max(prefix_cap, previous.prefix_cap + len(previous.common) - len(common))
        suffix_cap = max(max(g.suffix_lens) for g in groups) + self.gen.max_new_tokens
        suffix_cap = -(-suffix_cap // 8) * 8
        q = self.rows_per_group
        if self.batch.batch_size:
            n_groups = max(1, self.batch.batch_size // q)
        elif self.device.type == "cuda":
            n_groups = self._groups_from_memory(prefix_cap, suffix_cap, q, len(common))
        else:
            n_groups = 8
        return Layout(n_groups, q, prefix_cap, suffix_cap, common)

    def _groups_from_memory(self, prefix_cap: int, suffix_cap: int, q: int, head: int) -> int:
        """As many groups as fit in free memory after a measured reserve for prefill: the peak
        of one real prefill batch of the layout's shapes (room for heavy vision towers such as
        the 7B's 1024px SAM branch); a batch over 40% of free memory is halved first."""
        free, _ = torch.cuda.mem_get_info(self.device)
        started = time.perf_counter()
        peak = self._prefill_peak(head + prefix_cap, free)
        self.stats.probe_seconds += time.perf_counter() - started
        per_group = SlotKV.bytes_per_group(
            self.vlm.num_layers, self.vlm.num_kv_heads, self.vlm.head_dim, head + prefix_cap, q, suffix_cap,
            self.kv_dtype.itemsize,
        )
        return groups_that_fit(self.vlm, free, peak, per_group, MAX_DECODE_ROWS, q, self.gen.temperature > 0,
                               self.kv_memory_fraction)

    @torch.inference_mode()
    def _prefill_peak(self, prefix_cap: int, free: int) -> int:
        """Peak bytes of one prefill batch, shrinking the batch until it fits comfortably."""
        while True:
            batch = self._prefill_batch()
            try:
                peak = self._measure_prefill(batch, prefix_cap)
            except torch.OutOfMemoryError:
                peak = free
            finally:
                gc.collect()
                torch.cuda.empty_cache()
            if peak <= 0.4 * free or batch == 1:
                return peak
            self.prefill_batch_limit = max(1, batch // 2)

    def _measure_prefill(self, batch: int, prefix_cap: int) -> int:
        return prefill_peak_bytes(self.vlm, {v.name: v for v in self.views.values()}, self.pad_id, batch, prefix_cap)

    def close(self) -> None:
        """Free the KV cache and the captured graph (the engine allocates again when reused)."""
        self._release()
        self.layout = None

    def _release(self) -> None:
        self.store = None
        self.prefills.waiting.clear()
        self.launched.clear()
        if self.device.type == "cuda":
            gc.collect()  # the store's compiled callables form reference cycles; free its KV now
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _allocate(self, layout: Layout) -> None:
        self.store = SlotStore(
            self.vlm, self.views, layout, self.gen, self.eos_ids[0], self.pad_id, self._prefill_batch(),
            compile_steps=self.batch.compiles, cuda_graphs=self.batch.cuda_graphs, use_triton=self.batch.triton_attention,
            stop_schedule=self.stop_schedule, kv_dtype=self.kv_dtype, compile_decode=self.batch.compiles_decode,
            fusion=Fusion.of(self.batch),
        )
        self.layout = layout
        self.stats.slots = layout.rows
        self.stats.common_tokens = len(layout.common)
        self.stats.compile_seconds += self.store.compile_seconds
        self.stats.graph_seconds += self.store.graph_seconds
        self.free_groups = list(range(layout.groups - 1, -1, -1))
        self.freed = []
        self.finished_rows = []
        self.group_live = {}
        self.rows = {}

    @torch.inference_mode()
    def _admit(self, groups: list[Group]) -> list[Completion]:
        """Enqueue the prefill of new groups into free slots; their rows start decoding once it
        has run (at once unless overlapping, see `overlap.py`). OOM splits the batch and retries."""
        slots = [self.free_groups.pop() for _ in groups]
        try:
            self._prefill(groups, slots)
        except torch.OutOfMemoryError:
            return self._after_oom(groups, slots)
        return [] if self.prefills.overlapping else self._start_ready(wait=True)

    def _after_oom(self, groups: list[Group], slots: list[int]) -> list[Completion]:
        """Give the slots back and retry in halves; one group that does not fit gets error rows."""
        self.free_groups.extend(reversed(slots))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats.oom_splits += 1
        if len(groups) == 1:
            return [self._error(p, g, "out of memory on the device during prefill") for g in groups for p in g.prompts]
        half = len(groups) // 2
        return self._admit(groups[:half]) + self._admit(groups[half:])

    def _prefill(self, groups: list[Group], slots: list[int]) -> None:
        """Enqueue the vision tower and prefix prefill of new groups (on the prefill stream when
        overlapping); `_start` arms their rows once it has run."""
        store = self.store
        if not store.stop_schedule and any(p.force_eos_after for g in groups for p in g.prompts):
            raise ValueError("prompts with a forced-EOS schedule need an engine with stop_schedule set before its first run")
        items = list({id(g.item): g.item for g in groups}.values())
        started = time.perf_counter()
        clock = PhaseClock(self.device, self.batch.phase_timing)
        with self.prefills.enqueue():
            with phase(self.device_clock, "vision"):
                features = store.encode_images([(it.uid, it.pixels) for it in items if it.pixels])
            self.stats.vision_seconds += clock.lap()
            with phase(self.device_clock, "prefix"):
                logits = store.prefill_prefixes([g.prefix for g in groups], slots, [features.get(g.item.uid) for g in groups])
            self.stats.prefix_seconds += clock.lap()
        self.prefills.hold(groups, slots, logits)
        self.stats.prefill_seconds += time.perf_counter() - started
        self.stats.prefill_calls += 1

    @torch.inference_mode()
    def _start_ready(self, wait: bool) -> list[Completion]:
        """Start the rows of every admission whose prefill has finished (`wait`: the oldest,
        waiting for it, when nothing else is decoding)."""
        done: list[Completion] = []
        while (admission := self.prefills.ready(wait)) is not None:
            self.stats.overlapped_prefills += self.prefills.overlapping and not wait
            wait = False
            try:
                self._start(admission)
            except torch.OutOfMemoryError:
                done.extend(self._after_oom(admission.groups, admission.slots))
        return done

    def _start(self, admission: Admission) -> None:
        """Arm admitted groups' rows on the decode stream (VQA: after each question's prefill
        against its group's prefix); their first tokens are read with the next step. The host's
        bookkeeping changes last, so an OOM here leaves it as it was."""
        store, q, groups, slots = self.store, self.layout.rows_per_group, admission.groups, admission.slots
        new_rows = {  # row id -> (its request, its index in the admission's first tokens)
            slot * q + j: (Row(group.item.uid, prompt.index, len(prompt.input_ids), self.gen.max_new_tokens), gi * q + j)
            for gi, (group, slot) in enumerate(zip(groups, slots, strict=True)) for j, prompt in enumerate(group.prompts)
        }
        force = [(g.prompts[j].force_eos_after or NO_FORCE) if j < len(g.prompts) else NO_FORCE for g in groups for j in range(q)]
        padding = [slot * q + j for group, slot in zip(groups, slots, strict=True) for j in range(len(group.prompts), q)]
        with phase(self.device_clock, "suffix"):
            store.arm_groups(slots, [len(g.prefix) for g in groups])
            if q == 1:
                logits, rows_t = admission.logits, store.start_whole_prompt_rows(slots)
            else:
                logits, rows_t = store.prefill_suffixes([g.suffix(j) for g in groups for j in range(q)], slots)
            self.launched.append(store.start_rows(rows_t, logits, force, new_rows))
            if padding:  # rows of groups with fewer than Q questions: never live, so they read no keys
                store.release([], padding)
        for group, slot in zip(groups, slots, strict=True):
            self.group_live[slot] = len(group.prompts)
        self.rows.update({row_id: row for row_id, (row, _) in new_rows.items()})

    def _append(self, row_id: int, row: Row, token: int) -> Completion | None:
        row.tokens.append(token)
        if token in self.eos_ids:
            reason = "stop"
        elif len(row.tokens) >= row.max_new:
            reason = "length"
        else:
            return None
        del self.rows[row_id]
        self.finished_rows.append(row_id)
        slot = row_id // self.layout.rows_per_group
        self.group_live[slot] -= 1
        if self.group_live[slot] == 0:
            del self.group_live[slot]
            self.free_groups.append(slot)
            self.freed.append(slot)
        self.stats.generated_tokens += len(row.tokens)
        return Completion(row.uid, row.index, row.tokens, reason, row.prompt_tokens)

    @torch.inference_mode()
    def _decode(self) -> list[Completion]:
        """Launch the next step, then read everything launched before it (the device always
        has the newest step queued while the host turns older tokens into answers)."""
        started = time.perf_counter()
        if self.rows:
            with phase(self.device_clock, "decode"):
                self.launched.append(self.store.launch_decode(self.rows))
            self.stats.decode_steps += 1
        done: list[Completion] = []
        while len(self.launched) > 1 or (self.launched and not self.rows):
            done.extend(self._collect(self.launched.popleft()))
        with phase(self.device_clock, "decode"):
            self.store.release(self.freed, self.finished_rows)
        self.freed.clear()
        self.finished_rows.clear()
        self.stats.decode_seconds += time.perf_counter() - started
        return done

    def _collect(self, launched: Launched) -> list[Completion]:
        tokens = launched.tokens()
        done = []
        for row_id, (row, index) in launched.rows.items():
            if self.rows.get(row_id) is row:  # still the request that was there at launch
                finished = self._append(row_id, row, tokens[index])
                if finished:
                    done.append(finished)
        return done

    def _error(self, prompt: EnginePrompt, group: Group, message: str) -> Completion:
        return Completion(group.item.uid, prompt.index, [], "error", len(prompt.input_ids), error=message)

    def _fits(self, group: Group) -> bool:
        layout = self.layout
        own = len(group.prefix) - len(layout.common)
        fits = own <= layout.prefix_cap and max(group.suffix_lens) + self.gen.max_new_tokens <= layout.suffix_cap
        return fits and starts_with(group.prefix, layout.common)

    def run(self, items: Iterator[WorkItem]) -> Iterator[Completion]:
        source = iter(items)
        exhausted = False
        while True:
            exhausted = self._pull(source, exhausted)
            for item in self.unplanned:
                self.pending.extend(plan_groups(item, self.rows_per_group))
            self.unplanned.clear()
            yield from self._reject_too_long()
            busy = self.rows or self.launched or self.prefills.waiting
            needs_layout = self.layout is None or (not busy and self.deferred and not self.pending)
            if needs_layout and not self._reallocate():
                if exhausted:
                    return
                continue
            yield from self._admit_ready(exhausted)
            yield from self._start_ready(wait=not self.rows)
            if self.rows or self.launched:
                yield from self._decode()
            elif exhausted and not self.pending and not self.deferred and not self.prefills.waiting:
                return

    def _wanted(self) -> int:
        """Groups to queue before the next admission: at most one prefill batch, so an idle
        device starts on it while the rest is pulled (filling every free slot first idled it)."""
        if self.layout is None:
            return 2 * self._prefill_batch()
        return min(max(len(self.free_groups), 1), self._prefill_batch()) if not self.deferred else 0

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
        """Error rows for the prompts that cannot fit the model's positions; a group keeps its others."""
        self.pending, rejected = split_too_long(self.pending, self.vlm.max_positions - self.gen.max_new_tokens)
        message = f"prompt plus max_new_tokens exceeds the model's {self.vlm.max_positions} positions"
        yield from (self._error(p, group, message) for group, p in rejected)

    def _reallocate(self) -> bool:
        """First allocation, or a larger one when queued prompts outgrew the layout."""
        waiting = list(self.deferred) + list(self.pending)
        if not waiting:
            return False
        previous = self.layout
        self._release()
        layout = self._layout_for(waiting, previous)
        if previous is not None:
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
            take: list[Group] = []
            while self.pending and len(take) < min(self._prefill_batch(), len(self.free_groups)):
                group = self.pending.popleft()
                if len(group.prompts) > self.layout.rows_per_group or not self._fits(group):
                    self.deferred.append(group)
                else:
                    take.append(group)
            if not take:
                return
            yield from self._admit(take)
