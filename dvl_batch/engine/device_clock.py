"""Device time per engine phase, from CUDA events (the bench's accounting).

Host timers around asynchronous work measure when the host got back, not what the GPU
did: a decode launch returns at once while queued prefill still runs. Events recorded on
the stream before and after each phase time the device itself; since the engine issues
all of its work on one stream, the intervals do not overlap, and their sum is the
device's busy time (the rest of the wall time it was idle).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch


class DeviceClock:
    """Collects (start, end) event pairs per phase name; resolves them only when asked."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.marks: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.counts[name] += 1
        if not self.enabled:
            yield
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.marks[name].append((start, end))

    def seconds(self) -> dict[str, float]:
        """Device seconds per phase (waits for the device once)."""
        if not self.enabled:
            return {}
        torch.cuda.synchronize()
        return {name: sum(s.elapsed_time(e) for s, e in pairs) / 1000 for name, pairs in self.marks.items()}


def phase(clock: DeviceClock | None, name: str):
    """`clock.phase(name)`, or nothing when the engine runs without a clock (the product path)."""
    return clock.phase(name) if clock is not None else contextlib.nullcontext()
