"""Weight quantization of the language model (`--quantize`): fp8 natively, the rest with torchao.

torchao's int formats shrink the weights (less to read per step, more room for slots);
`fp8` instead multiplies large products faster and keeps the bf16 weights beside the
float8 ones (1.5x their memory). Only the language model's linear layers (and, for
torchao, the LM head) are quantized: the vision towers (SigLIP, and
SAM on the 7B) run once per image and are where small errors would hurt captions
most. Embeddings stay in full precision too, so the slot engine's scatter of image
features into the token embeddings is untouched.

`fp8` is this package's own `Fp8Linear` (float8 e4m3 through `torch._scaled_mm`, no
torchao needed) and runs in both engines. The int8 and int4 formats are torchao's and
run with `--engine generate` only: they save memory and weight reads, which pays for
small batches, but the slot engine multiplies hundreds of rows per step, where they
measured slower than bfloat16 (`benchmarks/weight_formats.py` on an H200, one decoder
layer, eager: int8 weight-only 0.34x at 1024 rows and 0.70x at 19712, int8 dynamic
0.02-0.08x, int4 weight-only 0.04-0.06x; compiled, int8 weight-only took 116-2192 ms for
what bf16 does in 0.2-2.7 ms, inductor autotuning it in vain).

torchao's API moved from functions (`int8_weight_only()`) to config classes
(`Int8WeightOnlyConfig()`); both are detected by name, never by version number.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class QuantMode:
    """One `--quantize` value: torchao's names for it and what the device must offer."""

    config_class: str  # torchao >= 0.10
    legacy_function: str  # older torchao
    needs_cuda: bool
    min_capability: tuple[int, int] | None = None
    needs_bfloat16: bool = False
    summary: str = ""
    native: bool = False  # this package's own layers (no torchao), fast in the slot engine


MODES: dict[str, QuantMode] = {
    "int8wo": QuantMode("Int8WeightOnlyConfig", "int8_weight_only", needs_cuda=False, summary="int8 weights, per channel"),
    "int8dq": QuantMode(
        "Int8DynamicActivationInt8WeightConfig", "int8_dynamic_activation_int8_weight", needs_cuda=False,
        summary="int8 weights and per-token dynamic int8 activations",
    ),
    "int4wo": QuantMode(
        "Int4WeightOnlyConfig", "int4_weight_only", needs_cuda=True, needs_bfloat16=True,
        summary="int4 weights in groups of 128 (tinygemm kernel)",
    ),
    "fp8": QuantMode(
        "Float8DynamicActivationFloat8WeightConfig", "float8_dynamic_activation_float8_weight", needs_cuda=True,
        min_capability=(8, 9), needs_bfloat16=True, summary="float8 e4m3 weights and dynamic activations, per row",
        native=True,
    ),
}
INT4_GROUP_SIZES = (128, 64, 32)  # torchao's int4 choices, coarsest (fastest) first


def import_torchao():
    """torchao's quantization module, or a UsageError saying how to install it.

    torchao logs a warning for each CUDA extension it cannot load (every CPU-only
    machine); those lines are noise in a job's log, so its logger is raised to ERROR.
    """
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError as exc:
        raise UsageError(
            "--quantize needs torchao: pip install 'dvl-batch[quant]' (or pip install torchao)"
        ) from exc
    if not hasattr(quantization, "quantize_"):
        raise UsageError("the installed torchao has no quantize_ API; upgrade it: pip install -U torchao")
    return quantization


def check_quantize(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a mode the device cannot run, before minutes go into loading weights."""
    if mode == "none":
        return
    if mode not in MODES:
        raise UsageError(f"unknown quantization '{mode}'; choose from none, {', '.join(MODES)}")
    need = MODES[mode]
    if need.needs_cuda and device.type != "cuda":
        raise UsageError(f"--quantize {mode} needs a CUDA GPU (no {mode} kernels for {device.type}); use int8wo here (torchao)")
    if need.min_capability and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < need.min_capability:
            wanted = ".".join(map(str, need.min_capability))
            raise UsageError(
                f"--quantize {mode} needs compute capability >= {wanted} (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use int8wo or int4wo with --engine generate"
            )
    if need.needs_bfloat16 and dtype != torch.bfloat16:
        raise UsageError(f"--quantize {mode} needs --dtype bfloat16 (got {str(dtype).replace('torch.', '')})")
    if not need.native:
        import_torchao()


def check_engine_quantize(mode: str, engine: str, device: torch.device) -> None:
    """On a GPU, torchao's int formats belong to `--engine generate` (the module docstring says
    why); on a CPU the slot engine runs uncompiled, and int8 is its only quantized format."""
    if mode in MODES and not MODES[mode].native and engine == "continuous" and device.type == "cuda":
        raise UsageError(
            f"--quantize {mode} on a GPU runs with --engine generate only: the slot engine multiplies hundreds of "
            f"rows per step, where torchao's int8/int4 layers measured slower than bfloat16; use --quantize fp8 "
            f"(Ada, Hopper) or add --engine generate"
        )


def int4_group_size(modules: list[torch.nn.Module]) -> int:
    """The coarsest group size dividing every layer's input width.

    torchao silently leaves a layer unquantized when its width is not a multiple of
    the group size; the real checkpoints' widths (2048, 4096, 5632, 11008) take 128.
    """
    widths = [m.in_features for m in modules if isinstance(m, torch.nn.Linear)]
    for size in INT4_GROUP_SIZES:
        if all(width % size == 0 for width in widths):
            return size
    return INT4_GROUP_SIZES[-1]


def _int4_kwargs(config_class, group_size: int) -> dict[str, Any]:
    """Group size, and the tinygemm layout where torchao offers a choice.

    torchao's newest default int4 layout needs the separate `mslk` kernels; the
    tinygemm layout runs on PyTorch's own `_weight_int4pack_mm`.
    """
    kwargs: dict[str, Any] = {"group_size": group_size}
    if "int4_packing_format" in inspect.signature(config_class).parameters:
        kwargs["int4_packing_format"] = "tile_packed_to_4d"
    return kwargs


def _fp8_kwargs(quantization) -> dict[str, Any]:
    """Per-row scales where available: per-tensor fp8 loses too much on LLM weights."""
    per_row = getattr(quantization, "PerRow", None)
    return {"granularity": per_row()} if per_row is not None else {}


def make_config(mode: str, quantization=None, int4_group: int = INT4_GROUP_SIZES[0]):
    """The torchao config object (or legacy function result) for a mode."""
    quantization = quantization or import_torchao()
    need = MODES[mode]
    config_class = getattr(quantization, need.config_class, None)
    if config_class is not None:
        kwargs: dict[str, Any] = {}
        if mode == "int4wo":
            kwargs = _int4_kwargs(config_class, int4_group)
        elif mode == "fp8":
            kwargs = _fp8_kwargs(quantization)
        if "set_inductor_config" in inspect.signature(config_class).parameters:
            kwargs["set_inductor_config"] = False  # nothing here is compiled; leave torch's global config alone
        return config_class(**kwargs)
    legacy = getattr(quantization, need.legacy_function, None)
    if legacy is None:
        raise UsageError(f"the installed torchao offers neither {need.config_class} nor {need.legacy_function}; upgrade torchao")
    return legacy(group_size=int4_group) if mode == "int4wo" else legacy()


def quantized_modules(model) -> dict[str, torch.nn.Module]:
    """What gets quantized: the language model's linear layers and the LM head."""
    language_model = model.model.language_model
    targets = {f"model.language_model.{name}": module for name, module in language_model.named_modules() if isinstance(module, torch.nn.Linear)}
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        targets["lm_head"] = head
    return targets


def quantize_model(model, mode: str, device: torch.device) -> int:
    """Quantize in place; returns how many linear layers were converted."""
    check_quantize(mode, device, model.dtype)
    if MODES[mode].native:
        from .fp8_linear import to_fp8_linears

        # the LM head is left out: it only ever sees a few rows (last tokens, decode steps),
        # which stay in bf16, so its float8 copy would only take memory from the KV slots
        head = model.get_output_embeddings()
        targets = {id(m) for m in quantized_modules(model).values() if m is not head}
        return to_fp8_linears(model, lambda _name, module: id(module) in targets)
    quantization = import_torchao()
    modules = list(quantized_modules(model).values())
    config = make_config(mode, quantization, int4_group_size(modules))
    targets = {id(m) for m in modules}
    try:
        quantization.quantize_(model, config, filter_fn=lambda module, _fqn: id(module) in targets)
    except (RuntimeError, NotImplementedError, AssertionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"torchao could not apply --quantize {mode} on {device.type}: {first}") from exc
    return len(targets)
