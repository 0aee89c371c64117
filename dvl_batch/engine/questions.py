"""VQA question prefill: each row's question tokens against its group's (already stored) prefix.

After an image's prefix (system prompt and image tokens) is stored once for its group,
each of the group's rows runs its own question through the language model, attending to
the shared prefix and causally to its own tokens (`AttentionStep` rows mode; on CUDA the
Triton suffix kernels). The batch is every question of an admission, right-padded to the
longest: a few thousand tokens of small matmuls and ~40 element-wise kernels per layer in
eager torch, launched one by one. Compiled (with the decode step's forward, `compile_decode`),
inductor fuses the element-wise work around the one opaque attention call, with the row count
and question width as dynamic sizes, so one compilation serves every admission.
"""

from __future__ import annotations

import logging

import torch

from .attention import AttentionStep

NEG_INF = float("-inf")
log = logging.getLogger(__name__)


class QuestionPrefill:
    """Question prefill over a `SlotStore`'s cache; `compiled` compiles its forward (CUDA)."""

    def __init__(self, store, compiled: bool):
        self.store = store
        self.forward = torch.compile(self._forward, dynamic=True) if compiled else self._forward

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        vlm = self.store.vlm
        return vlm.language_forward(vlm.embed_tokens(ids), positions, dvl_step=step)

    def __call__(self, suffixes: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(first-token logits, rows) for the questions of groups `slots`, group-major."""
        s = self.store
        q = s.layout.rows_per_group
        dev = s.device
        lengths = [max(len(x), 1) for x in suffixes]
        width = max(lengths)
        padded = [(x or [s.pad_id]) + [s.pad_id] * (width - max(len(x), 1)) for x in suffixes]
        ids_t = s.upload(padded)
        lengths_t = s.upload(lengths)
        group_t = s.upload(slots)
        rows_t = (group_t[:, None] * q + torch.arange(q, device=dev)[None]).reshape(-1)
        prefix_len = s.group_prefix[group_t]
        offsets = torch.arange(width, device=dev)
        positions = prefix_len.repeat_interleave(q)[:, None] + offsets[None]
        step = AttentionStep(
            s.kv, "rows", groups=group_t, rows=rows_t, rows_per_group=q,
            write_pos=torch.zeros(len(padded), dtype=torch.long, device=dev), out_dtype_scores=s.out_dtype_scores,
            prefix_lengths=s.group_prefix, triton_splits=s.triton_splits,
        )
        if not s.triton_splits:  # the torch path's masks
            causal = s.suffix_range[None, :] <= offsets[:, None]
            suffix_bias = torch.zeros(width, s.layout.suffix_cap, dtype=torch.float32, device=dev)
            step.suffix_bias = suffix_bias.masked_fill(~causal, NEG_INF)[None, None].expand(len(padded), 1, -1, -1)
            step.prefix_bias = s.prefix_bias(prefix_len)
        hidden = self.forward(ids_t, positions, step)
        last = hidden[torch.arange(len(padded), device=dev), lengths_t - 1]
        s.row_len[rows_t] = lengths_t
        s.row_prefix[rows_t] = prefix_len.repeat_interleave(q)
        return s.vlm.lm_head(last).float(), rows_t

    def warm(self) -> None:
        """Compile now (timed as compile time), not inside the run's first admission: questions
        of two lengths for group 0 (no request holds it yet; the rows are reset after). A failure
        of the compiled forward falls back to the eager one instead of stopping the job."""
        if self.forward == self._forward:
            return
        s = self.store
        questions = [[s.pad_id] * (5 + j % 3) for j in range(s.layout.rows_per_group)]
        try:
            for _ in range(2):
                self(questions, [0])
                questions = [x + [s.pad_id] * 4 for x in questions]
        except Exception as exc:  # noqa: BLE001 - the eager forward computes the same prefill
            log.warning("the compiled question prefill failed (%s); running it eagerly", str(exc).splitlines()[0])
            self.forward = self._forward
        s.reset_rows()
