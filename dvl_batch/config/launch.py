"""Launch defaults: what the environment a job starts in decides, read in one place.

The launcher's rank and world size (torchrun, SLURM), `RAY_ADDRESS`, the model cache,
the CPUs this process may use and so the number of decoder processes, and the one
reading of `--gpus`. The run applies `with_launch_defaults` once before it prepares a
job, so the CLI and `dvl_batch.run` behave the same; nothing deeper reads the
environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from ..errors import UsageError
from .sections import GPUS_PATTERN
from .validate import validate

Spec = TypeVar("Spec")  # a JobSpec, not imported: this module sits below config/spec.py

MAX_DECODERS_PER_ENGINE = 16


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as exc:
                raise UsageError(f"environment variable {name}={value!r} is not an integer") from exc
    return None


def rank_from_environment() -> tuple[int | None, int | None]:
    """(rank, world size) as the launcher set them: torchrun's RANK/WORLD_SIZE, else SLURM.

    A SLURM job array (--array=0-N, contiguous) counts each element as a rank, times the
    tasks of each element; a plain SLURM step uses SLURM_PROCID of SLURM_NTASKS.
    """
    if _env_int("RANK") is not None or _env_int("WORLD_SIZE") is not None:
        return _env_int("RANK"), _env_int("WORLD_SIZE")
    procid, ntasks = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
    array_count = _env_int("SLURM_ARRAY_TASK_COUNT")
    if array_count:
        index = (_env_int("SLURM_ARRAY_TASK_ID") or 0) - (_env_int("SLURM_ARRAY_TASK_MIN") or 0)
        return index * (ntasks or 1) + (procid or 0), array_count * (ntasks or 1)
    return procid, ntasks


def with_launch_defaults(spec: Spec) -> Spec:
    """Fill what the spec leaves open (None) from the environment: rank, world size, Ray address."""
    run = spec.run
    env_rank, env_world = rank_from_environment() if run.rank is None or run.world_size is None else (None, None)
    rank = run.rank if run.rank is not None else (env_rank or 0)
    world_size = run.world_size if run.world_size is not None else (env_world or 1)
    ray_address = run.ray_address or os.environ.get("RAY_ADDRESS") or None
    spec = replace(spec, run=replace(run, rank=rank, world_size=world_size, ray_address=ray_address))
    validate(spec)
    return spec


def default_cache_dir() -> Path:
    """Where the offline tiny models are built: $DVL_BATCH_CACHE, else the XDG cache."""
    if os.environ.get("DVL_BATCH_CACHE"):
        return Path(os.environ["DVL_BATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dvl-batch"


# `batch.compile: auto` compiles when at least this much input is left to read. Compiling
# costs ~20 s warm and ~65 s cold on the H200 (1.3B) and saves ~2 ms of device time per image
# (BENCHMARKS.md 0b/0c): it pays from ~10,000 images warm, ~2-3 GB of typical JPEGs.
AUTO_COMPILE_MIN_BYTES = 2 * 2**30


def resolve_compile(spec: Spec, todo_bytes: int | None, engines: int = 1) -> tuple[Spec, str | None]:
    """The job's `batch.compile` with "auto" decided by the input left to read per engine (each
    engine compiles for itself; None: unknown, e.g. remote shards, counts as large); also the
    notice to show when it turned compiling off."""
    batch = spec.batch
    if batch.compile != "auto":
        return spec, None
    large = todo_bytes is None or todo_bytes >= AUTO_COMPILE_MIN_BYTES * max(engines, 1)
    resolved = replace(spec, batch=replace(batch, compile=large))
    if large:
        return resolved, None
    share = f" for {engines} engines" if engines > 1 else ""
    return resolved, (f"small job ({todo_bytes / 2**20:.0f} MB of input left{share}): not compiling the engine's passes "
                      f"(it pays from ~{AUTO_COMPILE_MIN_BYTES / 2**30:.0f} GB of images per engine); --compile compiles anyway")


def use_compile_cache(cache: Path) -> None:
    """Keep torch.compile's and Triton's compiled artifacts under the tool's cache folder.

    Inductor's default is a folder in /tmp, which cluster jobs and reboots wipe; here the
    next run (a cron job, the next batch of shards) finds the kernels of the last one and
    starts without recompiling. A location the user set wins. Set before any engine
    process starts, so they inherit it.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "torch-compile"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def usable_cpus() -> int:
    """Cores this process may run on: a SLURM or cgroup CPU binding, not the whole machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def decoders_per_engine(cpus: int, engines: int = 1) -> int:
    """Split cores between the decoder pools of `engines` engines, one core kept for each engine."""
    return max(1, min(MAX_DECODERS_PER_ENGINE, (cpus - engines) // max(engines, 1)))


def default_decoders(engines: int = 1) -> int:
    """The decoder processes of one engine when `data.workers` is unset, from the CPU affinity mask."""
    return decoders_per_engine(usable_cpus(), engines)


@dataclass(frozen=True)
class GpuRequest:
    """`--gpus` read once: every GPU there is, or one engine per listed device."""

    every: bool  # "all"
    entries: tuple[str, ...] = ()  # "cpu" or "cuda:N", one engine each

    @property
    def engines(self) -> int | None:
        return None if self.every else len(self.entries)


def parse_gpus(gpus: str) -> GpuRequest:
    """'all', '0,1,3', 'cuda:2', 'cpu,cpu' -> a GpuRequest; one engine per entry, for every runner."""
    text = gpus.strip().lower().replace(" ", "")
    if not GPUS_PATTERN.fullmatch(text):
        raise UsageError(f"--gpus must be 'all', GPU indices like '0,1', or 'cpu,cpu', got '{gpus}'")
    if text == "all":
        return GpuRequest(True)
    entries = tuple(entry if entry == "cpu" else f"cuda:{entry.removeprefix('cuda:')}" for entry in text.split(","))
    listed = [d for d in entries if d != "cpu"]
    if len(set(listed)) != len(listed):
        raise UsageError(f"--gpus {gpus}: a GPU is listed twice (one engine per GPU)")
    return GpuRequest(False, entries)


def parse_device_list(gpus: str, visible_gpus: int | None = None) -> list[str]:
    """--gpus as torch device names of this machine, checked against the GPUs it can see.

    'cpu' entries start CPU engine processes: useful on machines without a GPU (and
    how the runner is tested), since each engine then uses its share of the cores.
    """
    request = parse_gpus(gpus)
    if visible_gpus is None:
        import torch

        visible_gpus = torch.cuda.device_count()
    if request.every:
        if visible_gpus == 0:
            raise UsageError("--gpus all: no CUDA device is visible here (--gpus cpu,cpu runs CPU engine processes)")
        return [f"cuda:{i}" for i in range(visible_gpus)]
    for device in request.entries:
        if device != "cpu" and int(device.split(":")[1]) >= visible_gpus:
            raise UsageError(f"--gpus {gpus}: {device} requested but {visible_gpus} GPU(s) are visible")
    return list(request.entries)
