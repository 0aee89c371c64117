"""The shard feed: this run's open shards, handed out one at a time to every process that asks.

One feed serves the local runner's decoders, or every engine process of the
multi-GPU runner and all their decoders (a counter in shared memory), or one Ray
call's chunk; whoever is faster simply takes more shards. Preprocessing sees it
only as a `records.ShardSupply`.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

from ..records import Shard


class ShardFeed:
    """Hands out shards one at a time to any number of processes (a shared counter)."""

    def __init__(self, shards: list[Shard], context: Any = None):
        context = context or mp.get_context()
        self.shards = list(shards)
        self.by_id = {shard.id: shard for shard in self.shards}
        self._next = context.Value("q", 0)
        self._closed = context.Value("b", 0)

    def take(self, claim: Callable[[int], None] | None = None) -> Shard | None:
        """The next shard; `claim(index)` records the taker under the lock (see decoder_pool)."""
        with self._next.get_lock():
            index = self._next.value
            if self._closed.value or index >= len(self.shards):
                return None
            self._next.value = index + 1
            if claim is not None:
                claim(index)
        return self.shards[index]

    def close(self) -> None:
        """Hand out nothing more (limit reached, or the run is stopping)."""
        with self._next.get_lock():
            self._closed.value = 1
