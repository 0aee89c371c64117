"""Batcher: group requests by prompt length and pad them for batched `generate`.

Left padding is what decoder-only generation needs (new tokens are appended on the
right for every row); bucketing by length keeps the padding, and so the wasted
attention and memory, small. Buckets are flushed when full, when the token budget is
reached, or when too many requests wait overall, so no shard waits forever for a
rare length to fill its bucket.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass
class LengthBucketer(Generic[T]):
    """Collects (length, request) pairs and releases batches of similar length."""

    batch_size: int
    token_budget: int | None = None
    bucket_width: int = 16
    max_waiting: int = 0  # 0: 4 * batch_size
    buckets: dict[int, list[tuple[int, T]]] = field(default_factory=dict)
    waiting: int = 0

    def _bucket_full(self, bucket: list[tuple[int, T]]) -> bool:
        if len(bucket) >= self.batch_size:
            return True
        if self.token_budget is None:
            return False
        longest = max(length for length, _ in bucket)
        return longest * len(bucket) >= self.token_budget

    def add(self, length: int, request: T) -> Iterator[list[T]]:
        """Queue one request; yield any batch that became ready."""
        bucket = self.buckets.setdefault(length // self.bucket_width, [])
        bucket.append((length, request))
        self.waiting += 1
        if self._bucket_full(bucket):
            yield self._take(length // self.bucket_width)
        limit = self.max_waiting or 4 * self.batch_size
        while self.waiting > limit:
            oldest = max(self.buckets, key=lambda k: len(self.buckets[k]))
            yield self._take(oldest)

    def _take(self, key: int) -> list[T]:
        bucket = self.buckets.pop(key)
        if self.token_budget is not None:
            bucket.sort(key=lambda pair: pair[0])
            kept: list[tuple[int, T]] = []
            for pair in bucket:
                if kept and pair[0] * (len(kept) + 1) > self.token_budget:
                    break
                kept.append(pair)
            rest = bucket[len(kept) :]
            if rest:
                self.buckets[key] = rest
            bucket = kept
        self.waiting -= len(bucket)
        return [request for _, request in bucket]

    def flush(self) -> Iterator[list[T]]:
        """Release everything still waiting, one batch per bucket (or budget slice)."""
        while self.buckets:
            yield self._take(next(iter(self.buckets)))


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists right-aligned; returns (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask
