"""The prefill of new images on a second CUDA stream, beside the decode steps.

Decode attention is bound by memory bandwidth (every step reads each live row's keys and
values at about the device's copy rate), the prefill of new images by matmul throughput.
Issued on one stream they run one after the other, and each leaves idle what the other
needs. Here an admission's vision tower and prefix prefill are enqueued on a second
stream while the decode steps keep going on the first, and its rows join the decode batch
at the first step after its prefill has finished (checked without waiting).

What the two streams share stays consistent by construction:
- the prefill writes only the keys/values of free group slots, which no live row reads (a
  row that ended in the step still in flight may read them; its token is discarded);
- everything decode reads about a new row (its group's prefix length, its own length and
  first token) is set on the decode stream, after that stream has waited for the prefill;
- the prefill's first-token logits are marked as used by the decode stream, so the
  allocator does not hand their memory back to the prefill stream while decode reads them.
Without CUDA (or with overlap off) an admission is ready as soon as it is enqueued.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .planning import Group

# The prefill stream's priority (CUDA: lower is more urgent; 0 is the decode stream's).
PREFILL_PRIORITY = 0


@dataclass
class Admission:
    """Groups whose prefill has been enqueued: their slots, first-token logits, and the
    event that fires when the prefill stream has finished them (None: already done)."""

    groups: list[Group]
    slots: list[int]
    logits: torch.Tensor
    done: torch.cuda.Event | None = None


class PrefillStream:
    """Where admissions are enqueued, and the queue of those not yet started."""

    def __init__(self, device: torch.device, enabled: bool, priority: int | None = None):
        self.device = device
        on = enabled and device.type == "cuda"
        self.stream = torch.cuda.Stream(device, priority=PREFILL_PRIORITY if priority is None else priority) if on else None
        self.waiting: deque[Admission] = deque()

    @property
    def overlapping(self) -> bool:
        return self.stream is not None

    @contextlib.contextmanager
    def enqueue(self) -> Iterator[None]:
        """Issue the prefill work of one admission (on the second stream when overlapping)."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def hold(self, groups: list[Group], slots: list[int], logits: torch.Tensor) -> None:
        """Queue an enqueued admission until its prefill has finished."""
        self.waiting.append(Admission(groups, slots, logits, self._finished_event(logits)))

    def _finished_event(self, logits: torch.Tensor) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        done = torch.cuda.Event()
        done.record(self.stream)
        logits.record_stream(torch.cuda.current_stream(self.device))
        return done

    def _decode_waits_for(self, done: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(done)

    def ready(self, wait: bool) -> Admission | None:
        """The oldest admission, if its prefill has finished (or `wait`: once it has); the
        decode stream is made to wait for it, so what is issued next sees its keys/values."""
        if not self.waiting:
            return None
        head = self.waiting[0]
        if head.done is not None:
            if not (wait or head.done.query()):
                return None
            self._decode_waits_for(head.done)
        return self.waiting.popleft()
