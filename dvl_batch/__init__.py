"""dvl-batch: batch captioning and visual question answering with DeepSeek-VL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import JobResult, run
    from .recipebook import bundled_recipes
    from .spec import JobSpec

__all__ = ["JobResult", "JobSpec", "bundled_recipes", "run", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports, so `dvl-batch --help` does not import torch."""
    if name in ("run", "JobResult"):
        from . import api

        return getattr(api, name)
    if name == "JobSpec":
        from .spec import JobSpec

        return JobSpec
    if name == "bundled_recipes":
        from .recipebook import bundled_recipes

        return bundled_recipes
    raise AttributeError(name)
