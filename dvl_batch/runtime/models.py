"""Which checkpoint a job uses: a hub id, a local folder, or the offline tiny model.

"auto" takes the 1.3B chat checkpoint when it is in the local cache or the hub
answers, and otherwise builds the offline tiny model, saying so. Resolving happens
once, when the job is prepared; engines and decoders only ever see the result.
"""

from __future__ import annotations

from pathlib import Path

from ..config.spec import ModelSpec
from ..errors import UsageError
from ..records import ResolvedModel

DEFAULT_MODEL = "deepseek-community/deepseek-vl-1.3b-chat"
TINY_NAMES = {"tiny": False, "tiny-hybrid": True}
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _hub_has(repo: str, offline: bool) -> bool:
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return True
    if offline:
        return False
    try:
        HfApi().model_info(repo, timeout=5)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable from here"
        return False


def resolve_model(spec: ModelSpec, cache_dir: Path, offline: bool = False) -> ResolvedModel:
    """Turn the user's model name into something from_pretrained can load."""
    from ..tiny import ensure_tiny_model, tiny_model_id

    name = spec.name.strip()
    if name in TINY_NAMES:
        path = ensure_tiny_model(cache_dir, hybrid=TINY_NAMES[name])
        return ResolvedModel(str(path), f"{name}:{tiny_model_id(TINY_NAMES[name])}", tiny=True)
    if name == "auto":
        if _hub_has(DEFAULT_MODEL, offline):
            return ResolvedModel(DEFAULT_MODEL, DEFAULT_MODEL, tiny=False)
        path = ensure_tiny_model(cache_dir)
        notice = (
            f"{DEFAULT_MODEL} is not cached and the hub is unreachable: using the offline tiny "
            "random-weight model (its text is gibberish). Pass --model ID_OR_DIR for real captions."
        )
        return ResolvedModel(str(path), f"tiny:{tiny_model_id(False)}", tiny=True, notice=notice)
    local = Path(name).expanduser()
    if local.exists():
        check_model_dir(local)
        marker = local / "dvl_batch_tiny.json"
        return ResolvedModel(str(local.resolve()), str(local.resolve()), tiny=marker.exists())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UsageError(f"model not found: '{name}' is neither a local folder nor a hub id like org/name")
    check_hub_model(name, spec.revision, offline)
    return ResolvedModel(name, name, tiny=False)


def check_hub_model(repo: str, revision: str | None, offline: bool) -> None:
    """A hub id is usable when it is in the local cache or the hub answers for it, asked once.

    Otherwise one UsageError line in seconds, instead of from_pretrained's minutes of
    retries: what was tried, and how to run from a local folder or the tiny model.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        return
    hint = "pass a downloaded checkpoint with --model /path/to/folder, or --model tiny for the offline test model"
    if offline:
        raise UsageError(f"model {repo} is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE); {hint}")
    try:
        HfApi().model_info(repo, revision=revision, timeout=5)
    except Exception as exc:  # noqa: BLE001 - not found, gated, no network: all end the same way
        why = type(exc).__name__
        if why in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
            reason = f"the hub has no {'revision ' + revision + ' of ' if revision else ''}{repo} that this machine may read ({why})"
        else:
            reason = f"it is not in the Hugging Face cache and the hub did not answer ({why})"
        raise UsageError(f"cannot use model {repo}: {reason}; {hint}") from None


def check_model_dir(path: Path) -> None:
    """A usable checkpoint folder has a config, weights and a processor."""
    if not path.is_dir():
        raise UsageError(f"model path {path} is not a folder")
    if not (path / "config.json").exists():
        raise UsageError(f"model folder {path} has no config.json")
    if not any((path / f).exists() for f in PROCESSOR_FILES):
        raise UsageError(f"model folder {path} has no processor (processor_config.json or preprocessor_config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UsageError(f"model folder {path} has no weights (*.safetensors)")
