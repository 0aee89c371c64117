"""The Python API: `run(JobSpec)` does exactly what `dvl-batch caption/vqa/run` do.

The CLI and this function share one run path (runtime/session.py), so scripts and
notebooks get the same launch defaults (rank and world size from the environment,
RAY_ADDRESS), checks, resume, locking, `output.strict` and error semantics as the
command line. Build the spec with `JobSpec.from_recipe(recipe, **options)`.
"""

from __future__ import annotations

from .config.launch import default_cache_dir, hub_offline
from .runtime.session import ErrorRowsError, JobResult, UnreadableShardsError, run_job

run = run_job

__all__ = ["ErrorRowsError", "JobResult", "UnreadableShardsError", "default_cache_dir", "hub_offline", "run"]
