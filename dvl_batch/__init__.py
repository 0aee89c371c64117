"""dvl-batch: batch captioning and visual question answering with DeepSeek-VL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import JobResult, run
    from .config.recipes import bundled_recipes
    from .config.spec import JobSpec

__all__ = ["JobResult", "JobSpec", "bundled_recipes", "run", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports, so `dvl-batch --help` does not import torch."""
    if name in ("run", "JobResult"):
        from . import api

        return getattr(api, name)
    if name == "JobSpec":
        from .config.spec import JobSpec

        return JobSpec
    if name == "bundled_recipes":
        from .config.recipes import bundled_recipes

        return bundled_recipes
    raise AttributeError(name)
