"""What the multi-process and Ray runners share: device lists, engine tasks, stats.

Both runners start several engines (a `DeviceWorker` each, in its own process) and
fold what each engine reports into the one reporter of the parent. Engines write
their parts straight into OUT; the parent only holds the lock and keeps score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ...config.launch import decoders_per_engine, usable_cpus
from ...config.spec import JobSpec
from ...engine.types import START_SECONDS
from ...records import ResolvedModel
from ..stats import RunStats


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
        for key in ("peak_memory_gib", *START_SECONDS):  # per engine, not summed: the largest one
            values = [e[key] for e in self.engine.values() if key in e]
            if values:
                total.engine[key] = max(values)
        return total
