"""The slot-engine runs of one bench profile: weight format x KV cache type, side by side.

The first run (bf16 weights, bf16 KV when asked for) is the reference the others are
compared with; quantized runs get their own copy of the model, so the bf16 weights stay
for the remaining runs and for transformers' generate.
"""

from __future__ import annotations


def variants(quantize: tuple[str, ...], kv_dtypes: tuple[str, ...], paired: bool = False) -> list[tuple[str, str]]:
    """(weights, KV cache) of each slot-engine run, the bf16/bf16 one first when asked for:
    every combination, or (`paired`) the i-th weights with the i-th KV type, which compares
    e.g. all-bf16 with all-fp8 without paying for the mixed runs in between."""
    runs = list(zip(quantize, kv_dtypes, strict=True)) if paired else [(q, kv) for q in quantize for kv in kv_dtypes]
    return sorted(dict.fromkeys(runs), key=lambda run: run != ("none", "auto"))


def check_variant_options(quantize: tuple[str, ...], kv_dtypes: tuple[str, ...], paired: bool) -> None:
    """One clear usage error for a bench's weight and KV options, before anything is built."""
    from ..config.sections import KV_DTYPES, QUANTIZE
    from ..errors import UsageError

    if any(k not in KV_DTYPES for k in kv_dtypes):
        raise UsageError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}")
    if any(q not in QUANTIZE for q in quantize):
        raise UsageError(f"--quantize must be one of {', '.join(QUANTIZE)}")
    if paired and len(quantize) != len(kv_dtypes):
        raise UsageError(f"--paired runs the i-th --quantize with the i-th --kv-dtype: give as many of each "
                         f"(got {len(quantize)} and {len(kv_dtypes)})")


def variant_name(quantize: str, kv_dtype: str) -> tuple[str, str]:
    """The JSON key and the table label of a run (`dvl`, `dvl_kv_fp8`, `dvl_w_fp8`, `dvl_w_fp8_kv_fp8`)."""
    if (quantize, kv_dtype) == ("none", "auto"):
        return "dvl", "dvl-batch (end to end)"
    parts = ([f"w_{quantize}"] if quantize != "none" else []) + ([f"kv_{kv_dtype}"] if kv_dtype != "auto" else [])
    words = ([f"{quantize} weights"] if quantize != "none" else []) + ([f"{kv_dtype} KV"] if kv_dtype != "auto" else [])
    return "dvl_" + "_".join(parts), f"dvl-batch, {', '.join(words)} (end to end)"


def weights_for(bf16_model, current, quantize: str):
    """The model of a run: the bf16 one, or a quantized copy (the bf16 weights stay for the
    other runs and for generate); a copy already made for the previous run is reused."""
    if quantize == "none":
        return bf16_model
    if current is not bf16_model and getattr(current, "dvl_quantize", None) == quantize:
        return current
    import copy

    from ..engine.fused_layers import fuse_projections
    from ..engine.quantize import quantize_model

    # a deep copy clones every tensor: unfused first, the copy holds the weights once (the bf16
    # engine fuses its model again when it next builds a store)
    fuse_projections(bf16_model.model.language_model, enabled=False)
    model = copy.deepcopy(bf16_model)
    quantize_model(model, quantize, next(bf16_model.parameters()).device)
    model.dvl_quantize = quantize
    return model
