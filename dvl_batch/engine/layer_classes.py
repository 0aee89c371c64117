"""Subclasses made at run time (a mixin in front of a transformers layer class) that pickle.

The slot engine gives some of transformers' layers a forward of its own by changing their
class to `Mixin + Original` (fused_layers.py, vision_layers.py). A class made with `type()`
is not an attribute of any module, so `torch.save(model)` / `pickle` could not name it. Each
such class is registered in its maker's module under its own name, and the module's
`__getattr__` makes it again on demand, so a model pickled after an engine ran loads in a
fresh process too. What both makers share (which linear layers hold plain weights, the class
a layer had before, one product made of several linear layers' weights) lives here as well.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .fp8_linear import Fp8Linear


def mixed_class(module_name: str, mixin: type, original: type, prefix: str, body: dict[str, Any] | None = None) -> type:
    """`prefix + original.__name__`, subclassing (mixin, original), as an attribute of module `module_name`.

    A different original class of the same name (another model's layer) gets a class of its
    own that is not registered: it works, only it does not pickle."""
    module = sys.modules[module_name]
    name = f"{prefix}{original.__name__}"
    made = module.__dict__.get(name)
    if isinstance(made, type) and made.__mro__[1:3] == (mixin, original):
        return made
    cls = type(name, (mixin, original), {"__module__": module_name, "__qualname__": name, **(body or {})})
    if made is None:
        setattr(module, name, cls)
    return cls


def original_class(layer: torch.nn.Module, mixin: type) -> type:
    """The layer's class before `mixed_class` changed it: (Mixed..., mixin, the original, ...)."""
    return type(layer).__mro__[2] if isinstance(layer, mixin) else type(layer)


def plain_linear(module: torch.nn.Module) -> bool:
    """An nn.Linear with ordinary floating-point tensors (torchao's weights are tensor subclasses)."""
    if type(module) is not torch.nn.Linear:
        return False
    tensors = [module.weight] + ([module.bias] if module.bias is not None else [])
    return all(type(t) in (torch.nn.Parameter, torch.Tensor) and t.dtype.is_floating_point and t.dtype.itemsize > 1
               for t in tensors)


def views_of(fused: torch.nn.Module, modules: list[torch.nn.Module]) -> bool:
    """Whether each module's weight is still a view of the fused product's (a replaced module, a
    deep copy or `.to()` makes new tensors)."""

    def pointer(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    if isinstance(fused, Fp8Linear) != all(type(m) is Fp8Linear for m in modules):
        return False
    pairs = [(fused.weight, [m.weight for m in modules])]
    if getattr(fused, "bias", None) is not None:
        pairs.append((fused.bias, [m.bias for m in modules]))
    if isinstance(fused, Fp8Linear):
        pairs.append((fused.linear.weight, [m.linear.weight for m in modules]))
    return all(w is not None and pointer(w) == pointer(whole) and w.dtype == whole.dtype and w.device == whole.device
               for whole, parts in pairs for w in parts)


def concatenated_linear(modules: list[torch.nn.Module]) -> torch.nn.Module:
    """One product for `modules` (all nn.Linear, or all Fp8Linear), whose tensors become views of its rows."""
    if type(modules[0]) is Fp8Linear:
        bf16 = concatenated_linear([m.linear for m in modules])
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
