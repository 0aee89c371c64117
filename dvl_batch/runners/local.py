"""The local runner: one device worker in this process takes every open shard."""

from __future__ import annotations

from typing import Callable

from ..job import PreparedJob
from ..pipeline import RunStats, StopFlag
from ..preprocess import ShardFeed
from ..worker import DeviceWorker


def run_local(job: PreparedJob, on_progress: Callable[[RunStats], None], stop: StopFlag) -> RunStats:
    gpus = job.spec.run.gpus
    worker = DeviceWorker(job.spec, job.model, device=f"cuda:{int(gpus)}" if gpus and gpus.isdigit() else None)
    feed = ShardFeed(job.todo)
    return worker.process(feed, job.out, job.metadata, on_progress=on_progress, stop=stop)
