"""How much device memory one prefill batch needs: the reserve the slot engine keeps free
when it sizes its KV cache from the memory left over (engine/continuous.py)."""

from __future__ import annotations

import torch

from .attention import AttentionStep
from .model import VisionLanguageModel


def prefill_peak_bytes(vlm: VisionLanguageModel, views: dict, pad_id: int, batch: int, width: int) -> int:
    """Peak bytes of one real prefill batch of `batch` prompts `width` tokens wide: the vision
    tower on zero images of every view, then the language model over pad tokens (its keys and
    values collected, as the compiled pass returns them) and the last-token logits."""
    dev = vlm.device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    pixels = {name: torch.zeros(batch, 3, v.size, v.size, dtype=vlm.dtype, device=dev) for name, v in views.items()}
    features = vlm.image_features(pixels)
    ids = torch.full((batch, width), pad_id, dtype=torch.long, device=dev)
    positions = torch.arange(width, device=dev)[None].expand(batch, -1)
    step = AttentionStep(None, "prefix", collect=[])
    hidden = vlm.language_forward(vlm.embed_tokens(ids), positions, dvl_step=step)
    vlm.lm_head(hidden[:, -1]).float()
    torch.cuda.synchronize(dev)
    del features, hidden, step
    return torch.cuda.max_memory_allocated(dev) - base


def groups_that_fit(vlm: VisionLanguageModel, free: int, prefill_peak: int, per_group: int, rows: int, q: int,
                    sampling: bool, fraction: float) -> int:
    """KV groups of `q` rows for `free` bytes, `rows` rows at most: what is left after 2 GiB,
    1.25x the prefill peak and the logits of a step of `rows` (greedy: logits, argmax and the
    graph pool's copy; sampling adds its buffer, sort and cumsum), `fraction` of it, less one
    spare group."""
    copies = 6 if sampling else 3
    logits = rows * vlm.lm_head.weight.shape[0] * 4 * copies
    most = rows // q
    reserve = 2 * 2**30 + logits + int(1.25 * prefill_peak)
    budget = max(0, free - reserve) * fraction
    return int(max(1, min(most, budget // per_group - 1)))
