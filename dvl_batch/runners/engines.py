"""What the multi-process and Ray runners share: device lists, engine tasks, stats.

Both runners start several engines (a `DeviceWorker` each, in its own process) and
fold what each engine reports into the one reporter of the parent. Engines write
their parts straight into OUT; the parent only holds the lock and keeps score.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..engine.model import ResolvedModel
from ..errors import UsageError
from ..pipeline import RunStats
from ..spec import GPUS_PATTERN, JobSpec

MAX_DECODERS_PER_ENGINE = 16


def parse_device_list(gpus: str, visible_gpus: int | None = None) -> list[str]:
    """'all', '0,1,3', 'cuda:2', 'cpu,cpu' -> torch device names, checked against this machine.

    'cpu' entries start CPU engine processes: useful on machines without a GPU (and
    how the runner is tested), since each engine then uses its share of the cores.
    """
    text = gpus.strip().lower().replace(" ", "")
    if not GPUS_PATTERN.fullmatch(text):
        raise UsageError(f"--gpus must be 'all', GPU indices like '0,1', or 'cpu,cpu', got '{gpus}'")
    if visible_gpus is None:
        import torch

        visible_gpus = torch.cuda.device_count()
    if text == "all":
        if visible_gpus == 0:
            raise UsageError("--gpus all: no CUDA device is visible here (--gpus cpu,cpu runs CPU engine processes)")
        return [f"cuda:{i}" for i in range(visible_gpus)]
    devices = [entry if entry == "cpu" else f"cuda:{entry.removeprefix('cuda:')}" for entry in text.split(",")]
    listed = [d for d in devices if d != "cpu"]
    if len(set(listed)) != len(listed):
        raise UsageError(f"--gpus {gpus}: a GPU is listed twice (one engine process per GPU)")
    for device in listed:
        if int(device.split(":")[1]) >= visible_gpus:
            raise UsageError(f"--gpus {gpus}: {device} requested but {visible_gpus} GPU(s) are visible")
    return devices


def usable_cpus() -> int:
    """Cores this process may run on: a SLURM or cgroup CPU binding, not the whole machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def decoders_per_engine(cpus: int, engines: int) -> int:
    """Split a machine's cores between the decoder pools of its engines (one core each kept)."""
    return max(1, min(MAX_DECODERS_PER_ENGINE, (cpus - engines) // max(engines, 1)))


def spec_for_engines(spec: JobSpec, engines: int, cpus: int | None = None) -> JobSpec:
    """The spec each engine runs: the decoder count split between engines unless the user set it."""
    if spec.data.workers is not None:
        return spec
    workers = decoders_per_engine(cpus or usable_cpus(), engines)
    return replace(spec, data=replace(spec.data, workers=workers))


@dataclass(frozen=True)
class EngineTask:
    """Everything one engine process needs to build its DeviceWorker (picklable)."""

    index: int
    device: str  # torch device name inside the engine's process
    spec: JobSpec
    model: ResolvedModel
    out_root: str
    rank: int
    world_size: int
    metadata: dict[str, Any]
    torch_threads: int | None = None  # CPU engines share the cores


def quiet_transformers() -> None:
    """Engines run without a terminal of their own: no weight-loading bars, no warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def snapshot(stats: RunStats) -> dict[str, Any]:
    """A copy of stats that can cross a process boundary (taken now, not when sent)."""
    return asdict(stats)


def stats_from(data: dict[str, Any]) -> RunStats:
    return RunStats(**data)


@dataclass
class StatsTally:
    """The sum over engines of what they finished plus what they are working on.

    An engine reports `running` snapshots (cumulative for the piece of work it is on)
    and a `finished` total when that piece is done. Engine counters (idle time, OOM
    retries) are cumulative per engine, so the latest per engine counts; peak memory
    is a maximum, not a sum.
    """

    finished: RunStats = field(default_factory=RunStats)
    running: dict[Any, RunStats] = field(default_factory=dict)
    engine: dict[Any, dict[str, float]] = field(default_factory=dict)

    def update(self, worker: Any, stats: RunStats) -> None:
        self.running[worker] = stats
        if stats.engine:
            self.engine[worker] = stats.engine

    def finish(self, worker: Any, stats: RunStats) -> None:
        self.running.pop(worker, None)
        self.finished.add(RunStats(**{**asdict(stats), "engine": {}}))
        if stats.engine:
            self.engine[worker] = stats.engine

    def forget(self, worker: Any) -> None:
        """Drop a lost engine's unfinished work: it will be redone."""
        self.running.pop(worker, None)

    def total(self) -> RunStats:
        total = RunStats()
        total.add(self.finished)
        for stats in self.running.values():
            total.add(RunStats(**{**asdict(stats), "engine": {}}))
        for engine in self.engine.values():
            total.add(RunStats(engine=engine))
        peaks = [e["peak_memory_gib"] for e in self.engine.values() if "peak_memory_gib" in e]
        if peaks:
            total.engine["peak_memory_gib"] = max(peaks)
        return total
