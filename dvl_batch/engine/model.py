"""Model loading and the thin adapter the engines use to drive transformers' modules.

Loading is real `from_pretrained` on a hub id or a local folder that the run resolved
(`runtime/models.py` says which). The adapter exposes only the pieces the slot engine
composes (token embedding, image features, the language model, the LM head); the
modules themselves stay transformers' own.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config.spec import ModelSpec
from ..errors import UsageError
from ..records import ResolvedModel

__all__ = ["ResolvedModel", "VisionLanguageModel", "load_model", "pick_device", "pick_dtype"]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_attention(name: str, device: torch.device) -> None:
    """flash_attention_2 needs the flash-attn package and a CUDA device; say so up front."""
    if name != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); or use sdpa")
    if device.type != "cuda":
        raise UsageError("--attn-implementation flash_attention_2 needs a CUDA GPU; use sdpa")


def kv_cache_dtype(name: str) -> torch.dtype | None:
    """The slot engine's key/value element type for `model.kv_dtype` (None: the model's)."""
    return torch.float8_e4m3fn if name == "fp8" else None


def check_kv_dtype(name: str, device: torch.device) -> None:
    """An fp8 cache is for Hopper-class GPUs (the decode kernels widen fp8 as they load it);
    on CPU it would only be slower, so say so up front instead of running it."""
    if name == "auto":
        return
    if device.type != "cuda":
        raise UsageError("--kv-dtype fp8 needs a CUDA GPU (compute capability 8.9 or newer); on CPU use --kv-dtype auto")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UsageError(f"--kv-dtype fp8 needs compute capability 8.9 or newer (Ada, Hopper); {device} has {major}.{minor}")


def load_model(resolved: ResolvedModel, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """from_pretrained in eval mode on `device` (or spread with device_map="auto")."""
    from transformers import AutoModelForImageTextToText

    check_attention(spec.attn_implementation, device)
    if spec.quantize != "none":
        from .quantize import check_quantize

        check_quantize(spec.quantize, device, dtype)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=spec.attn_implementation, revision=spec.revision)
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"cannot load model {resolved.label}: {str(exc).splitlines()[0]}") from exc
    if not spec.device_map:
        model = model.to(device)
    model.eval()
    if spec.quantize != "none":
        from .quantize import quantize_model

        quantize_model(model, spec.quantize, device)
    return model


class VisionLanguageModel:
    """The parts of a DeepSeek-VL (or hybrid) model that the slot engine composes."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.language_model = model.model.language_model
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.image_token_id = int(model.config.image_token_id)
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.num_heads = text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.hidden_size = text.hidden_size
        self.max_positions = getattr(text, "max_position_embeddings", 16384)
        self.device = self.embed_tokens.weight.device
        self.dtype = self.embed_tokens.weight.dtype
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)

    def image_features(self, pixels: dict[str, torch.Tensor], **vision_kwargs) -> torch.Tensor:
        """[n_images, tokens_per_image, hidden] for already normalised pixel tensors
        (`vision_kwargs` reach the towers' layers, e.g. vision_layers.VISION_KWARG)."""
        out = self.model.model.get_image_features(**pixels, **vision_kwargs)
        features = getattr(out, "pooler_output", None)
        if features is None:
            features = out[0] if isinstance(out, (tuple, list)) else out
        return features

    def language_forward(self, embeds: torch.Tensor, positions: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        """Final hidden states of the language model; caching and masking are done by our attention.

        A placeholder 4D mask makes transformers skip its own mask construction, which
        inspects position ids on the host (waiting for the device) to detect packing.
        """
        out = self.language_model(
            inputs_embeds=embeds, position_ids=positions, attention_mask=self._no_mask, use_cache=False,
            **attention_kwargs,
        )
        return out.last_hidden_state
