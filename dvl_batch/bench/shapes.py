"""Random weights of the real checkpoint shapes, and the FLOPs they cost per request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

MEASURED_BF16_PEAK_TFLOPS = {"H100": 795.0, "H200": 790.0}  # 8192^3 bf16 matmul on the lent machines


def _real_config(image_token_id: int, vocab: int, bos: int, eos: int):
    from transformers import DeepseekVLConfig

    return DeepseekVLConfig(
        text_config=dict(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=vocab, max_position_embeddings=16384, rms_norm_eps=1e-6,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=384, patch_size=16,
        ),
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


def build_model(shape: str, device: torch.device, dtype: torch.dtype, cache_dir: Path):
    """Random weights of the chosen shape with the tiny model's tokenizer and processor.

    Returns (model, processor, processor_dir); the pipeline's workers load the
    processor from processor_dir.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..tiny import ensure_tiny_model

    tiny = ensure_tiny_model(cache_dir)
    processor = AutoProcessor.from_pretrained(tiny)
    if shape == "tiny":
        model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=dtype).to(device).eval()
        return model, processor, str(tiny)
    tok = processor.tokenizer
    config = _real_config(processor.image_token_id, 102400, tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    return model.eval(), processor, str(tiny)


@dataclass
class FlopModel:
    """FLOPs of the useful work, from the model's shapes (2 per multiply-add)."""

    vision_per_image: float
    llm_per_token: float  # all linear layers of the language model
    lm_head_per_token: float
    attn_per_token_per_ctx: float  # QK^T and PV per token per attended position
    params_bytes: float

    @classmethod
    def of(cls, model) -> FlopModel:
        t, v = model.config.text_config, model.config.vision_config
        h, f, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
        kv = (getattr(t, "num_key_value_heads", None) or t.num_attention_heads) * (h // t.num_attention_heads)
        llm = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * f)
        vh, vf, vl = v.hidden_size, v.intermediate_size, v.num_hidden_layers
        n = (v.image_size // v.patch_size) ** 2
        vision = 2 * vl * n * (4 * vh * vh + 2 * vh * vf) + 4 * vl * n * n * vh + 2 * n * (3 * v.patch_size**2 * vh)
        vision += 2 * n * (vh * h + h * h)  # aligner
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return cls(vision, llm, 2 * h * t.vocab_size, 4 * layers * h, params)

    def request_flops(self, prompt_tokens: int, generated: int, images: int, share_image: bool = False) -> float:
        prefill = prompt_tokens * self.llm_per_token + self.attn_per_token_per_ctx * prompt_tokens * prompt_tokens / 2
        decode = generated * (self.llm_per_token + self.lm_head_per_token)
        decode += self.attn_per_token_per_ctx * sum(prompt_tokens + t for t in range(generated))
        return (0 if share_image else images * self.vision_per_image) + prefill + decode + self.lm_head_per_token


def measured_peak() -> tuple[float, str]:
    if not torch.cuda.is_available():
        return float("nan"), "n/a (CPU)"
    name = torch.cuda.get_device_name()
    for key, value in MEASURED_BF16_PEAK_TFLOPS.items():
        if key in name:
            return value, f"{value:.0f} TFLOP/s measured bf16 matmul peak ({name})"
    return float("nan"), f"unknown peak ({name})"
