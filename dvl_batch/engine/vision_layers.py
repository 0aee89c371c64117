"""The slot engine's own forward for SigLIP encoder layers: fc1's bias and GELU in the matmul.

SigLIP's MLP multiplies by fc1 (1024 -> 4096), writes that product to memory, reads it back
for the tanh GELU, writes the result and reads it again for fc2. On the H200 the GELU kernel
alone is ~0.07-0.12 ms per image of a ~0.9 ms vision tower (traced, BENCHMARKS 0f and 0j).
cuBLASLt can apply the bias and the same tanh-approximated GELU in the matmul's epilogue
(`torch._addmm_activation(..., use_gelu=True)`, which torch.compile keeps as a library call),
so the 4096-wide product is written once, already activated.

The epilogue applies GELU to the float32 accumulator, where transformers rounds fc1's output
to bfloat16 first: the features differ in the last bits from transformers' (closer to a
float32 reference, measured by `benchmarks/epilogues.py`), so answers can differ from
`generate`'s in rare near-ties, like any kernel change. `batch.vision_epilogue: false`
(`bench --no-vision-epilogue`) keeps transformers' arithmetic.

Only calls that carry `dvl_vision=True` (the slot engine's image encoding) take this path;
`generate` on the same model runs the layer's own forward. Layers whose activation is not
the tanh GELU, whose fc1 has no bias, or whose weights are not plain floating-point tensors
keep theirs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layer_classes import mixed_class, original_class, plain_linear

VISION_KWARG = "dvl_vision"


class EpilogueSiglipLayer:
    """Mixin put in front of a SigLIP encoder layer's class: the slot engine's forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if not kwargs.pop(VISION_KWARG, False):
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask,
                                          **kwargs)
        hidden_states = residual + hidden_states
        return hidden_states + gelu_mlp(self.mlp, self.layer_norm2(hidden_states))


def engine_image_features(vlm, enabled: bool) -> Callable:
    """The image encoder the slot engine runs: `vlm.image_features`, with the epilogue forward
    in every eligible SigLIP layer when `enabled` (taken away again when not)."""
    if not use_vision_epilogue(vlm.model, enabled):
        return vlm.image_features
    return functools.partial(vlm.image_features, **{VISION_KWARG: True})


def gelu_mlp(mlp: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """fc2(gelu_tanh(fc1(x))) with fc1's bias and GELU in cuBLASLt's epilogue (CUDA).

    Elsewhere the same tanh GELU unfused: CPU's `_addmm_activation` applies the exact (erf)
    GELU, not SigLIP's (tests/test_gpu.py checks that CUDA's is the tanh one)."""
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    if flat.is_cuda:
        inner = torch._addmm_activation(mlp.fc1.bias, flat, mlp.fc1.weight.t(), use_gelu=True)
    else:
        inner = F.gelu(F.linear(flat, mlp.fc1.weight, mlp.fc1.bias), approximate="tanh")
    return mlp.fc2(inner).view(*shape[:-1], -1)


def use_vision_epilogue(model: torch.nn.Module, enabled: bool = True) -> int:
    """Give every eligible SigLIP encoder layer under `model` the epilogue forward (idempotent;
    `enabled` False takes it away again); returns how many layers have it."""
    count = 0
    for module in model.modules():
        if isinstance(module, EpilogueSiglipLayer) and not (enabled and _eligible(module)):
            module.__class__ = original_class(module, EpilogueSiglipLayer)
        elif enabled and not isinstance(module, EpilogueSiglipLayer) and _is_siglip_layer(module) and _eligible(module):
            module.__class__ = mixed_class(__name__, EpilogueSiglipLayer, type(module), "Epilogue")
        count += isinstance(module, EpilogueSiglipLayer)
    return count


def _is_siglip_layer(module: torch.nn.Module) -> bool:
    """A layer whose forward is transformers' SigLIP encoder layer's (the arithmetic replaced here)."""
    from transformers.models.siglip import modeling_siglip as siglip

    return type(module).forward is siglip.SiglipEncoderLayer.forward and type(getattr(module, "mlp", None)).forward \
        is siglip.SiglipMLP.forward


def _eligible(layer: torch.nn.Module) -> bool:
    """The tanh GELU, an fc1 bias, plain floating-point weights on a real device, and no
    accelerate hooks (an offloading hook replaces `forward` and moves weights in per call)."""
    mlp = layer.mlp
    if any(hasattr(m, "_hf_hook") for m in (layer, mlp, getattr(mlp, "fc1", None), getattr(mlp, "fc2", None))):
        return False
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    linears = (getattr(mlp, "fc1", None), getattr(mlp, "fc2", None))
    if act != "gelu_pytorch_tanh" or not all(plain_linear(m) for m in linears) or mlp.fc1.bias is None:
        return False
    return all(t.device.type != "meta" for t in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight))


def __getattr__(name: str) -> type:
    """Unpickling a model in a fresh process: its layers' class, made again (layer_classes.py)."""
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    if name == f"Epilogue{SiglipEncoderLayer.__name__}":
        return mixed_class(__name__, EpilogueSiglipLayer, SiglipEncoderLayer, "Epilogue")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
