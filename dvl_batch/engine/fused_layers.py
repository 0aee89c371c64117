"""The slot engine's own forward for transformers' Llama decoder layers, with fused projections.

transformers' Llama layer multiplies the same normalised hidden states by several weights one
after the other: query, key and value (three products of N = 2048 on the 1.3B model) and
gate and up (two of N = 5632). Concatenating each set into one weight makes them one product
each: the input is read (and, with `--quantize fp8`, quantised) once, and the decode step's
few hundred rows fill the GPU, which a 2048-wide product of ~800 rows does not (112 output
tiles of 128 x 128 for 132 SMs). Measured on the H200 in isolation (one layer's products):
QKV 7% and gate/up 2% faster at a prefill's 19712 rows.

Only the slot engine's calls (those that carry a `dvl_step`) take the fused path; any other
call, e.g. transformers' `generate` on the same loaded model, runs the layer's own forward.
The original modules are re-pointed at row slices of the concatenated weights, so fusing
adds no memory and the original forward multiplies exactly the same numbers. float8
projections (`fp8_linear.Fp8Linear`, one scale per output row) concatenate exactly too.
The fused products are plain attributes, not registered submodules: they are not saved with
the model and not counted twice among its parameters.

Layers with other projections (torchao's tensor-subclass weights, mixed formats) keep
transformers' forward: fusing them would mean re-quantising, not concatenating.
"""

from __future__ import annotations

import torch

from .attention import slot_attention
from .fp8_linear import Fp8Linear
from .layer_classes import mixed_class, original_class, plain_linear


class FusedProjectionsLayer:
    """Mixin put in front of a Llama decoder layer's class: the slot engine's forward."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        step = kwargs.get("dvl_step")
        if step is None:
            return super().forward(hidden_states, *args, **kwargs)
        attn, mlp = self.self_attn, self.mlp
        shape = hidden_states.shape[:-1]
        normed = self.input_layernorm(hidden_states)
        qkv = self.dvl_qkv(normed)
        query, key, value = (
            part.view(*shape, -1, attn.head_dim).transpose(1, 2) for part in qkv.split(self.dvl_qkv_sizes, dim=-1)
        )
        cos, sin = kwargs["position_embeddings"]
        query, key = self.dvl_rotate(query, key, cos, sin)
        out, _ = slot_attention(attn, query, key, value, None, scaling=attn.scaling, dvl_step=step)
        hidden_states = hidden_states + attn.o_proj(out.reshape(*shape, -1))
        gate, up = self.dvl_gate_up(self.post_attention_layernorm(hidden_states)).chunk(2, dim=-1)
        return hidden_states + mlp.down_proj(mlp.act_fn(gate) * up)


def fuse_projections(language_model: torch.nn.Module, enabled: bool = True) -> int:
    """Give every eligible decoder layer the fused forward (idempotent; `enabled` False takes it
    away again, for a run that measures without it); returns how many layers have it.

    A layer fused earlier whose projections were replaced or moved since (a quantized or deep
    copy of a model the bf16 engine ran on, a `.to()`) is fused again from what it has now, or
    goes back to transformers' forward if that cannot be fused."""
    fused = 0
    for layer in getattr(language_model, "layers", ()):
        sources = _projections(layer)
        current = isinstance(layer, FusedProjectionsLayer) and _current(layer, sources)
        if isinstance(layer, FusedProjectionsLayer) and not (current and enabled):
            _unfuse(layer)
        if enabled and not isinstance(layer, FusedProjectionsLayer) and sources and _fusable(sources[:3]) and _fusable(sources[3:5]):
            _fuse(layer, sources)
        fused += isinstance(layer, FusedProjectionsLayer)
    return fused


def _projections(layer: torch.nn.Module) -> list[torch.nn.Module] | None:
    """q, k, v, gate, up of a layer whose forwards are transformers' Llama ones, or None.

    The fused forward is Llama's arithmetic; a layer of the same shape with more in it (Qwen3's
    q/k norms, other norm placements) must keep its own forward."""
    from transformers.models.llama import modeling_llama as llama

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not (
        original_class(layer, FusedProjectionsLayer).forward is llama.LlamaDecoderLayer.forward
        and getattr(type(attn), "forward", None) is llama.LlamaAttention.forward
        and getattr(type(mlp), "forward", None) is llama.LlamaMLP.forward
    ):
        return None
    return [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]


def _current(layer: torch.nn.Module, sources: list[torch.nn.Module] | None) -> bool:
    """Whether the fused products are still made of these modules' tensors: each weight a view
    of the fused one (a replaced module, a deep copy or `.to()` makes new tensors)."""
    return sources is not None and _views_of(layer.dvl_qkv, sources[:3]) and _views_of(layer.dvl_gate_up, sources[3:5])


def _views_of(fused: torch.nn.Module, modules: list[torch.nn.Module]) -> bool:
    def pointer(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    if isinstance(fused, Fp8Linear) != all(type(m) is Fp8Linear for m in modules):
        return False
    pairs = [(fused.weight, [m.weight for m in modules])]
    if getattr(fused, "bias", None) is not None:  # Llama with attention_bias / mlp_bias
        pairs.append((fused.bias, [m.bias for m in modules]))
    if isinstance(fused, Fp8Linear):
        pairs.append((fused.linear.weight, [m.linear.weight for m in modules]))
    return all(w is not None and pointer(w) == pointer(whole) and w.dtype == whole.dtype and w.device == whole.device
               for whole, parts in pairs for w in parts)


def _fusable(modules: list[torch.nn.Module]) -> bool:
    if len({getattr(m, "bias", None) is None for m in modules}) > 1:  # Llama's have all biases or none
        return False
    if all(plain_linear(m) for m in modules):
        return True
    return (
        all(type(m) is Fp8Linear and plain_linear(m.linear) for m in modules)
        and len({m.min_rows for m in modules}) == 1
    )


@torch.inference_mode(False)
@torch.no_grad()
def _fuse(layer: torch.nn.Module, sources: list[torch.nn.Module]) -> None:
    # ordinary tensors even when the engine is built under inference_mode: the re-pointed
    # weights stay usable outside it (training, load_state_dict) like the ones they replace.
    # plain attributes (object.__setattr__): not submodules, so not in state_dict or parameters()
    object.__setattr__(layer, "dvl_qkv", _concatenated(sources[:3]))
    object.__setattr__(layer, "dvl_gate_up", _concatenated(sources[3:5]))
    layer.dvl_qkv_sizes = [m.out_features for m in sources[:3]]
    layer.__class__ = _fused_class(type(layer))


def _fused_class(original: type) -> type:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the layers are Llama's

    return mixed_class(__name__, FusedProjectionsLayer, original, "Fused", {"dvl_rotate": staticmethod(apply_rotary_pos_emb)})


def __getattr__(name: str) -> type:
    """Unpickling a model in a fresh process: its layers' class, made again (layer_classes.py)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if name == f"Fused{LlamaDecoderLayer.__name__}":
        return _fused_class(LlamaDecoderLayer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unfuse(layer: torch.nn.Module) -> None:
    for name in ("dvl_qkv", "dvl_gate_up", "dvl_qkv_sizes"):
        layer.__dict__.pop(name, None)
    layer.__class__ = original_class(layer, FusedProjectionsLayer)


def _concatenated(modules: list[torch.nn.Module]) -> torch.nn.Module:
    """One product for `modules` (all nn.Linear, or all Fp8Linear), whose tensors become views of its rows."""
    if type(modules[0]) is Fp8Linear:
        bf16 = _concatenated([m.linear for m in modules])
        weight = _stacked(modules, "weight", dim=0)
        scale = _stacked(modules, "weight_scale", dim=1)  # [1, out]: one scale per output row
        return Fp8Linear(bf16, weight, scale, modules[0].min_rows)
    weight = _stacked(modules, "weight", dim=0)
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if modules[0].bias is not None:
        fused.bias = torch.nn.Parameter(_stacked(modules, "bias", dim=0), requires_grad=False)
    return fused


def _stacked(modules: list[torch.nn.Module], name: str, dim: int) -> torch.Tensor:
    """The modules' tensors `name` concatenated along `dim`; each module's becomes a view of its slice."""
    whole = torch.cat([getattr(m, name).detach() for m in modules], dim=dim)
    start = 0
    for m in modules:
        size = getattr(m, name).shape[dim]
        part = whole.narrow(dim, start, size)
        setattr(m, name, torch.nn.Parameter(part, requires_grad=False) if name in m._parameters else part)
        start += size
    return whole
