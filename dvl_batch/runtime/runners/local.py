"""The local runner: one device worker in this process takes every open shard."""

from __future__ import annotations

from collections.abc import Callable

from ...config.launch import parse_device_list
from ..feed import ShardFeed
from ..job import PreparedJob
from ..stats import RunStats, StopFlag
from ..worker import DeviceWorker


def run_local(job: PreparedJob, on_progress: Callable[[RunStats], None], stop: StopFlag) -> RunStats:
    gpus = job.spec.run.gpus  # one entry ('1', 'cuda:1', 'cpu') or None for --device
    worker = DeviceWorker(job.spec, job.model, device=parse_device_list(gpus)[0] if gpus else None)
    feed = ShardFeed(job.todo)
    return worker.process(feed, job.out, job.metadata, on_progress=on_progress, stop=stop)
