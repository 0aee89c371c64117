"""The slot engine's own forward for SigLIP encoder layers: fc1's bias and GELU in the matmul,
and query, key and value as one product.

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

The attention's query, key and value are three 1024-wide products of the same normalised
input, each with its bias; traced in the engine, each ran at ~50% of the matmul peak (the
32-image prefill's 18432 rows by 1024 columns is too narrow a product for cuBLAS to fill the
card). With `fuse_projections` (the language model's fusion, fused_layers.py) they become one
3072-wide product of the concatenated weights, as there; the original modules are re-pointed
at its row slices, so this adds no memory and each column is the same dot product.

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

from .layer_classes import concatenated_linear, mixed_class, original_class, plain_linear, views_of

VISION_KWARG = "dvl_vision"


class EpilogueSiglipLayer:
    """Mixin put in front of a SigLIP encoder layer's class: the slot engine's forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if not kwargs.pop(VISION_KWARG, False):
            return super().forward(hidden_states, attention_mask, **kwargs)
        normed = self.layer_norm1(hidden_states)
        if QKV in self.__dict__:
            attended = fused_qkv_attention(self.self_attn, self.__dict__[QKV], normed, attention_mask)
        else:
            attended, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + gelu_mlp(self.mlp, self.layer_norm2(hidden_states))


def engine_image_features(vlm, enabled: bool, fuse_qkv: bool = True) -> Callable:
    """The image encoder the slot engine runs: `vlm.image_features`, with the engine's forward
    in every eligible SigLIP layer when `enabled` (taken away again when not), its Q/K/V as one
    product when `fuse_qkv` too."""
    if not use_vision_epilogue(vlm.model, enabled, fuse_qkv):
        return vlm.image_features
    return functools.partial(vlm.image_features, **{VISION_KWARG: True})


def fused_qkv_attention(attn: torch.nn.Module, qkv: torch.nn.Module, hidden_states: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' SiglipAttention.forward with its three input products made as one."""
    from transformers.models.siglip import modeling_siglip as siglip

    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    queries, keys, values = (part.view(shape).transpose(1, 2) for part in qkv(hidden_states).chunk(3, dim=-1))
    interface = siglip.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                             siglip.eager_attention_forward)
    out, _ = interface(attn, queries, keys, values, attention_mask, is_causal=attn.is_causal, scaling=attn.scale,
                       dropout=attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous())


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


def use_vision_epilogue(model: torch.nn.Module, enabled: bool = True, fuse_qkv: bool = True) -> int:
    """Give every eligible SigLIP encoder layer under `model` the engine's forward, with one Q/K/V
    product where `fuse_qkv` and the projections allow (idempotent; `enabled` False takes it
    away again; a fused product whose weights were replaced or moved since is made again);
    returns how many layers have the forward."""
    count = 0
    for module in model.modules():
        if isinstance(module, EpilogueSiglipLayer) and not (enabled and _eligible(module)):
            module.__dict__.pop(QKV, None)
            module.__class__ = original_class(module, EpilogueSiglipLayer)
        elif enabled and not isinstance(module, EpilogueSiglipLayer) and _is_siglip_layer(module) and _eligible(module):
            module.__class__ = mixed_class(__name__, EpilogueSiglipLayer, type(module), "Epilogue")
        if isinstance(module, EpilogueSiglipLayer):
            _place_qkv(module, fuse_qkv)
            count += 1
    return count


QKV = "dvl_qkv"


def _projections(attn: torch.nn.Module) -> list[torch.nn.Module]:
    return [attn.q_proj, attn.k_proj, attn.v_proj]


@torch.inference_mode(False)
@torch.no_grad()
def _place_qkv(layer: torch.nn.Module, fuse: bool) -> None:
    """One product of q/k/v's concatenated weights as a plain attribute of the layer (not a
    submodule: not saved with the model nor counted among its parameters), or none."""
    fused = layer.__dict__.get(QKV)
    if not (fuse and _qkv_fusable(layer.self_attn)):
        layer.__dict__.pop(QKV, None)
    elif fused is None or not views_of(fused, _projections(layer.self_attn)):
        object.__setattr__(layer, QKV, concatenated_linear(_projections(layer.self_attn)))


def _qkv_fusable(attn: torch.nn.Module) -> bool:
    """transformers' SigLIP attention with plain, biased, same-shaped q/k/v on a real device."""
    from transformers.models.siglip import modeling_siglip as siglip

    projections = _projections(attn)
    return (type(attn).forward is siglip.SiglipAttention.forward
            and not any(hasattr(m, "_hf_hook") for m in (attn, *projections))
            and all(plain_linear(m) and m.bias is not None and m.weight.device.type != "meta" for m in projections)
            and len({(m.weight.shape, m.weight.dtype, m.weight.device) for m in projections}) == 1)


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
