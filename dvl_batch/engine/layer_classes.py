"""Subclasses made at run time (a mixin in front of a transformers layer class) that pickle.

The slot engine gives some of transformers' layers a forward of its own by changing their
class to `Mixin + Original` (fused_layers.py, vision_layers.py). A class made with `type()`
is not an attribute of any module, so `torch.save(model)` / `pickle` could not name it. Each
such class is registered in its maker's module under its own name, and the module's
`__getattr__` makes it again on demand, so a model pickled after an engine ran loads in a
fresh process too. The checks both makers share (which linear layers hold plain weights, the
class a layer had before) live here as well.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


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
