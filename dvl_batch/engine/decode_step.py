"""The slot engine's decode step: one token for every row that holds a request.

Rows are compacted before the model runs: the step's linear layers, norms and LM head
see only the live rows, padded up to one of a few bucket sizes, and each bucket is
captured once as a CUDA graph. A VQA group keeps its slot until its longest answer
ends, so about 40% of its rows are finished at any step (measured: 2431 steps x 1020
slots for 1.47M tokens); a caption layout has freed slots waiting for the next
admission, and a run's tail empties. The Triton kernel takes the compacted batch as it
is: caption rows (one per group) as entries that each read the slot they name; VQA rows
through per-group entries (`group_entries`: a group's live rows are consecutive in the
sorted batch, and its prefix is read once for all of them). No program is spent on an
empty slot. The torch path scatters the rows into the whole layout for attention (a
finished row's suffix length is zero, so it reads nothing) and gathers them back.

Padding entries point at one spare row past the layout (of the scratch group past the
layout's groups): its keys are written at suffix position 0 and read back by its own entry
only, its scratch prefix has length 0 (nothing is ever admitted there), and its token is
never sent home.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .attention import AttentionStep

NEG_INF = float("-inf")
log = logging.getLogger(__name__)


class DecodeStep:
    """Bucketed, compacted decode over a `SlotStore`'s state (and its CUDA graphs)."""

    def __init__(self, store, cuda_graphs: bool):
        self.store = store
        self.rows = store.layout.rows
        self.spare = self.rows
        grain = max(64, -(-self.rows // 16)) if store.on_cuda else 4  # few graphs; CPU tests still pad
        self.buckets = sorted({min(self.rows, k * grain) for k in range(1, -(-self.rows // grain) + 1)})
        dev = store.device
        self.live = torch.full((self.rows + 1,), self.spare, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(self.rows + 1, dtype=torch.long, device=dev)
        vocab = store.vlm.lm_head.weight.shape[0]
        sampling = store.gen.temperature > 0
        self.logits = torch.zeros(self.rows + 1, vocab, dtype=torch.float32, device=dev) if sampling else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        q = store.layout.rows_per_group
        self.grouped = bool(store.triton_splits) and q > 1  # VQA through the kernel: entries per live group
        self.entries = torch.zeros(3, self.rows + 1, dtype=torch.long, device=dev) if self.grouped else None
        self.compile_seconds = 0.0  # the warm-ups that compile the decode forward (when it is compiled)
        if cuda_graphs and store.on_cuda:
            self._capture()
        elif store.on_cuda:
            self._warm_without_graphs()

    def _capacity(self, bucket: int) -> int:
        return entry_capacity(bucket, self.store.layout.groups, self.store.layout.rows_per_group)

    def _set_rows(self, row_ids: list[int], bucket: int) -> None:
        """Upload the step's sorted row ids, padded with the spare row to `bucket` (and, for
        groups of several rows, their group entries) in one copy, into the static buffers."""
        padded = np.asarray(row_ids + [self.spare] * (bucket - len(row_ids)), dtype=np.int64)
        if not self.grouped:
            self.live[:bucket].copy_(self.store.upload(padded))
            return
        layout = self.store.layout
        capacity = self._capacity(bucket)
        entries = group_entries(padded, layout.rows_per_group, capacity, spare_group=layout.groups)
        packed = self.store.upload(np.concatenate([padded, entries.ravel()]))
        self.live[:bucket].copy_(packed[:bucket])
        self.entries[:, :capacity].copy_(packed[bucket:].view(3, capacity))

    def bucket(self, count: int) -> int:
        """The smallest captured batch that holds `count` live rows."""
        return next(b for b in self.buckets if b >= count)

    def body(self, bucket: int) -> None:
        """The step for the first `bucket` entries of `live`: tokens (and logits when sampling)
        land in static buffers, so a graph replay leaves them where the host expects them."""
        s = self.store
        live = self.live[:bucket]
        groups = s.layout.groups
        step = AttentionStep(
            s.kv, "rows", rows_per_group=s.layout.rows_per_group, write_pos=s.row_len, groups_limit=groups,
            out_dtype_scores=s.out_dtype_scores, prefix_lengths=s.group_prefix, triton_splits=s.triton_splits,
            live=live, entries=self.entries[:, : self._capacity(bucket)] if self.grouped else None,
        )
        if not s.triton_splits:
            valid = s.suffix_range[None, :] <= s.row_len[: self.rows, None]
            suffix_bias = torch.zeros(valid.shape, dtype=torch.float32, device=s.device).masked_fill(~valid, NEG_INF)
            step.prefix_bias = s.prefix_bias(s.group_prefix[:groups])
            step.suffix_bias = suffix_bias[:, None, None, :]
        positions = (s.row_prefix + s.row_len)[live][:, None]
        tokens = s.next_tok[live][:, None]
        torch._dynamo.maybe_mark_dynamic(tokens, 0)  # compiled forward: the bucket is a dynamic size
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        logits = s.decode_fn(tokens, positions, step)
        if self.logits is None:  # greedy: the token (and the stop schedule) is picked in the graph
            self.tokens[:bucket].copy_(s.pick(logits, *self._schedule(live)))
        else:  # sampling draws from the generator outside the graph, in `launch`
            self.logits[:bucket].copy_(logits)

    def _schedule(self, live: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`pick`'s forced-EOS arguments for the live rows (none without the bench's schedule)."""
        s = self.store
        return (s.force_at[live] if s.stop_schedule else None), s.n_gen[live]

    def _every_row_live(self, bucket: int | None = None) -> None:
        """The first `bucket` rows (default: all) live: the warm-ups' and captures' state."""
        self._set_rows(list(range(bucket or self.rows)), bucket or self.rows)

    def body_all(self) -> None:
        """Every row of the layout live (the bench's attention-share measurement)."""
        self._every_row_live()
        self.body(self.rows)

    def _capture(self) -> None:
        """Warm up on a side stream, then capture each bucket, largest first, in one memory
        pool (outputs live in static buffers, so the graphs can share it); row state is
        reset after."""
        s = self.store
        current = torch.cuda.current_stream(s.device)
        stream = torch.cuda.Stream(s.device)
        pool = torch.cuda.graph_pool_handle()
        for index, bucket in enumerate(reversed(self.buckets)):
            self._every_row_live(bucket)  # (group entries must match the bucket they are read with)
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                if index < 2:  # the compiled forward compiles at the first two sizes (see _first_run)
                    self._first_run(bucket)
                self.body(bucket)
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.body(bucket)
            self.graphs[bucket] = graph
        s.reset_rows()  # (the row buffers now hold the smallest bucket's rows: `launch` sets them before a replay)

    def _first_run(self, bucket: int) -> None:
        """A warm-up step that compiles the compiled decode forward, timed as compile time.

        It compiles twice: at the first size everything after the opaque attention call is
        specialised to that size, and the second size makes those pieces dynamic (torch's
        automatic dynamic shapes); later sizes compile nothing. A failure of the compiled
        forward falls back to the eager one instead of stopping the job.
        """
        s = self.store
        if s.decode_fn == s._decode_pass:
            self.body(bucket)
            return
        started = time.perf_counter()
        try:
            self.body(bucket)
        except Exception as exc:  # noqa: BLE001 - the eager forward computes the same step
            log.warning("the compiled decode forward failed (%s); decoding with the eager one", str(exc).splitlines()[0])
            s.decode_fn = s._decode_pass
            self.body(bucket)
        torch.cuda.synchronize(s.device)
        self.compile_seconds += time.perf_counter() - started

    def _warm_without_graphs(self) -> None:
        """--no-cuda-graphs with the compiled forward: compile now (and fall back if needed),
        not inside the first step of the run."""
        for bucket in list(reversed(self.buckets))[:2]:
            self._every_row_live(bucket)
            self._first_run(bucket)
        self.store.reset_rows()

    def launch(self, rows: dict):
        """Enqueue one step for the rows holding requests (row id -> Row); returns the
        tokens in flight, indexed in the order of the sorted row ids."""
        s = self.store
        row_ids = sorted(rows)
        bucket = self.bucket(len(row_ids))
        self._set_rows(row_ids, bucket)
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
        else:
            self.body(bucket)
        live = self.live[:bucket]
        tokens = self.tokens[:bucket]
        if self.logits is not None:
            tokens = s.pick(self.logits[:bucket], *self._schedule(live))
        s.next_tok.index_copy_(0, live, tokens)
        s.row_len.add_(s.row_live).clamp_(max=s.layout.suffix_cap - 1)  # freed rows stay at 0
        s.n_gen.add_(1)
        return s.send_home(tokens, {row_id: (rows[row_id], i) for i, row_id in enumerate(row_ids)})


def group_entries(rows: np.ndarray, rows_per_group: int, capacity: int, spare_group: int) -> np.ndarray:
    """[3, capacity] (group, first batch row, row count) for a compacted batch of sorted row ids.

    A group's live rows are consecutive in the batch (row ids are group-major); runs of the
    spare row (the bucket's padding) become entries of at most `rows_per_group` rows over the
    spare group, so every batch row belongs to exactly one entry. Unused entries: 0 rows."""
    groups = rows // rows_per_group
    first = np.ones(len(rows), dtype=bool)
    first[1:] = groups[1:] != groups[:-1]
    run_start = np.flatnonzero(first)
    position = np.arange(len(rows)) - run_start[np.cumsum(first) - 1]
    first |= position % rows_per_group == 0  # (only spare runs are longer than a group)
    starts = np.flatnonzero(first)
    assert len(starts) <= capacity, "more groups than entries"
    out = np.zeros((3, capacity), dtype=np.int64)
    out[0] = spare_group
    out[0, : len(starts)] = groups[starts]
    out[1, : len(starts)] = starts
    out[2, : len(starts)] = np.diff(np.append(starts, len(rows)))
    return out


def entry_capacity(bucket: int, groups: int, rows_per_group: int) -> int:
    """Entries a bucket's grid needs: each live group one, the padding one per `rows_per_group` rows."""
    return min(bucket, groups + -(-bucket // rows_per_group))
