"""A two-level KV cache and the attention function that reads it.

Requests are organised as groups (one image prompt prefix each) of up to Q rows (one
per question about that image). Keys/values of the shared prefix, the system prompt
and image tokens, are stored once per group; the tokens after it (question, answer)
are stored per row. Attention for the rows of a group reads the prefix once for all
of them, which is where VQA saves most of its decode memory traffic, and a finished
row or group frees its slot at once (continuous batching with fixed shapes, so the
decode step can be captured in a CUDA graph).

The function is registered through transformers' AttentionInterface, so the Llama
modules run unchanged; it falls back to SDPA when called without a `dvl_step`
(e.g. by `generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_NAME = "dvl_batch_slots"
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def to_cache(values: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Keys or values in the cache's dtype: an fp8 cache saturates at +-448 (no inf in e4m3fn)
    rather than trusting the conversion's overflow behaviour."""
    if values.dtype == cache_dtype:
        return values
    if cache_dtype.itemsize == 1:
        values = values.clamp(-FP8_MAX, FP8_MAX)
    return values.to(cache_dtype)


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor viewed as bytes, for the indexed copies that torch implements for
    every byte type but not (on every device) for float8."""
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 and tensor.dtype.is_floating_point else tensor


def _widen(cache_part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The torch path computes in the queries' dtype; an fp8 cache is upcast as it is read."""
    return cache_part if cache_part.dtype == dtype else cache_part.to(dtype)


@dataclass
class SlotKV:
    """Per-layer key/value storage: [layers, groups, kv_heads, S + P, head_dim] and [layers, rows, kv_heads, Ls,
    head_dim], and optionally the common head every prompt of the layout starts with, [layers, kv_heads, S, head_dim]
    (the system prompt): computed once instead of in every prefill, and copied into the first S positions of
    each group's prefix as the prefill stores it, so that decode reads one contiguous prefix per group (reading
    one shared copy of the head cost more than it saved: caption decode attention on the H200 went 2.33 ms per
    image without it to 2.49 with a kernel program of its own and 2.78 with a tile in the first split)."""

    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    suffix_k: torch.Tensor
    suffix_v: torch.Tensor
    common_k: torch.Tensor | None = None
    common_v: torch.Tensor | None = None

    @classmethod
    def allocate(cls, layers, groups, rows, kv_heads, prefix_len, suffix_len, head_dim, dtype, device,
                 common_len: int = 0) -> SlotKV:
        def make(count: int, length: int) -> torch.Tensor:
            return torch.zeros(layers, count, kv_heads, length, head_dim, dtype=dtype, device=device)

        common = [make(1, common_len)[:, 0] for _ in range(2)] if common_len else [None, None]
        width = common_len + prefix_len
        return cls(make(groups, width), make(groups, width), make(rows, suffix_len), make(rows, suffix_len), *common)

    @property
    def common_len(self) -> int:
        return 0 if self.common_k is None else self.common_k.shape[2]

    def common(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The common head's keys and values of one layer ([kv_heads, S, head_dim]), if any."""
        return None if self.common_k is None else (self.common_k[layer], self.common_v[layer])

    @staticmethod
    def bytes_per_group(layers, kv_heads, head_dim, prefix_len, rows_per_group, suffix_len, element_size) -> int:
        return 2 * layers * kv_heads * head_dim * element_size * (prefix_len + rows_per_group * suffix_len)

    @property
    def suffix_capacity(self) -> int:
        return self.suffix_k.shape[3]


@dataclass
class AttentionStep:
    """What one language-model forward does with the cache.

    mode "prefix": the batch is the prefixes of `groups` (all of equal length);
    their keys/values are stored and attention is plain causal.
    mode "rows": the batch is rows (group-major, `rows_per_group` per group) whose
    T new tokens are written at `write_pos`; attention reads the group's prefix
    (masked by `prefix_bias`) and the row's own suffix (masked by `suffix_bias`).
    `groups`/`rows` of None mean every slot, in order (the decode step).
    """

    kv: SlotKV
    mode: str
    groups: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    rows_per_group: int = 1
    write_pos: torch.Tensor | None = None  # [B] first suffix position written by this step
    prefix_bias: torch.Tensor | None = None  # [G_batch, 1, 1, P] additive
    suffix_bias: torch.Tensor | None = None  # [B, 1, T, Ls] additive
    groups_limit: int | None = None  # with groups=None: use the first N prefix slots (the rest are scratch)
    out_dtype_scores: bool = False  # bf16 matmul with float32 output (CUDA), instead of upcasting K
    prefix_lengths: torch.Tensor | None = None  # [G] valid prefix positions of every slot (the Triton paths)
    triton_splits: int = 0  # > 0: through the Triton kernels (decode: with this many prefix splits)
    collect: list | None = None  # prefix mode: append (key, value) per layer here instead of storing them
    live: torch.Tensor | None = None  # compacted decode: batch row i is row live[i] of the whole layout
    entries: torch.Tensor | None = None  # ... and with groups of several rows, [3, E] per live group (decode_step.group_entries)


def _scores(query: torch.Tensor, keys: torch.Tensor, out_dtype_scores: bool) -> torch.Tensor:
    """query @ keys^T in float32, like SDPA's accumulation (bf16 scores would lose ~3 digits)."""
    if query.dtype == torch.float32:
        return torch.matmul(query, keys.transpose(-1, -2))
    if out_dtype_scores:
        lead = query.shape[:-2]
        out = torch.bmm(
            query.reshape(-1, *query.shape[-2:]), keys.transpose(-1, -2).reshape(-1, keys.shape[-1], keys.shape[-2]),
            out_dtype=torch.float32,
        )
        return out.reshape(*lead, out.shape[-2], out.shape[-1])
    return torch.matmul(query.float(), keys.float().transpose(-1, -2))


def scores_support_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch/device computes bf16 x bf16 -> fp32 batched matmuls directly."""
    try:
        a = torch.ones(1, 2, 8, device=device, dtype=dtype)
        torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _write_prefix(step: AttentionStep, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    length = key.shape[2]
    key, value = to_cache(key, step.kv.prefix_k.dtype), to_cache(value, step.kv.prefix_v.dtype)
    groups = slice(None) if step.groups is None else step.groups
    as_bits(step.kv.prefix_k[layer])[groups, :, :length] = as_bits(key)
    as_bits(step.kv.prefix_v[layer])[groups, :, :length] = as_bits(value)


def _whole_words(tensor: torch.Tensor) -> bool:
    """Whether `tensor` can be viewed as int64: rows, strides and offset in whole 8-byte words
    (the strides of size-1 dimensions do not matter)."""
    size = tensor.element_size()
    if tensor.stride(-1) != 1 or tensor.shape[-1] * size % 8 or tensor.storage_offset() * size % 8:
        return False
    return all(stride * size % 8 == 0 for stride, n in zip(tensor.stride()[:-1], tensor.shape[:-1], strict=True) if n > 1)


def as_words(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whose rows are whole 8-byte words viewed as int64, else as `as_bits`.

    Indexed copies move one element per thread step: on 2-byte (or 1-byte) elements
    torch's index kernels reached ~1 TB/s on the H200 (profile_engine.py `store_kv`);
    the same bytes as 8-byte words move in a quarter (an eighth) of the steps.
    """
    if _whole_words(tensor):
        try:
            return as_bits(tensor).view(torch.int64)
        except RuntimeError:  # a layout this torch will not reinterpret: element-wise, same bytes
            pass
    return as_bits(tensor)


def store_prefix(cache: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write prefill keys (or values) [B, H, T, D] into cache [G, H, P, D] at group `slots`.

    A full-width write (the compiled pass's fixed shapes) is one `index_copy_` of whole
    group blocks; a narrower one (eager, batch-wide prefix length) indexes the positions.
    Both move 8-byte words where the rows allow (`as_words`).
    """
    length = kv.shape[2]
    cache, kv = as_words(cache), as_words(kv)
    if cache.dtype != kv.dtype:  # one side would not take the word view: both copy elements
        cache, kv = as_bits(cache), as_bits(kv)
    if length == cache.shape[2]:
        cache.index_copy_(0, slots, kv)
    else:
        cache[slots, :, :length] = kv


def _write_rows(step: AttentionStep, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    batch, _, new, _ = key.shape
    if step.live is not None:
        rows, start = step.live, step.write_pos[step.live]
    else:
        rows = step.rows if step.rows is not None else torch.arange(batch, device=key.device)
        start = step.write_pos
    positions = start[:, None] + torch.arange(new, device=key.device)[None, :]
    positions = positions.clamp_(max=step.kv.suffix_capacity - 1)
    key, value = to_cache(key, step.kv.suffix_k.dtype), to_cache(value, step.kv.suffix_v.dtype)
    as_bits(step.kv.suffix_k[layer])[rows[:, None], :, positions] = as_bits(key.transpose(1, 2))
    as_bits(step.kv.suffix_v[layer])[rows[:, None], :, positions] = as_bits(value.transpose(1, 2))


def _compacted_attention(step: AttentionStep, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Decode over live rows only: their queries are placed in a whole-layout batch (finished
    rows read no keys), attention runs as for every row, and the live rows' outputs come
    back in batch order; padding entries point at the spare row past the layout."""
    layout_rows = step.kv.suffix_k.shape[1] - 1
    whole = query.new_zeros(layout_rows + 1, *query.shape[1:])
    whole.index_copy_(0, step.live, query)
    inner = replace(step, live=None, entries=None, write_pos=step.write_pos[:layout_rows])
    out = whole.new_zeros(whole.shape)
    out[:layout_rows] = _rows_attention(inner, layer, whole[:layout_rows], scaling)
    return out[step.live]


def _rows_attention(step: AttentionStep, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of new row tokens over [group prefix | own suffix], merged in one softmax."""
    if step.live is not None:
        if step.triton_splits and query.shape[2] == 1 and (step.rows_per_group == 1 or step.entries is not None):
            return _triton_rows_attention(step, layer, query, scaling)  # the kernel reads the slots live[b] itself
        return _compacted_attention(step, layer, query, scaling)
    if step.triton_splits and query.shape[2] == 1 and step.groups is None and step.rows is None:
        return _triton_rows_attention(step, layer, query, scaling)
    if step.triton_splits and step.groups is not None and step.rows is not None:
        return _triton_suffix_attention(step, layer, query, scaling)
    kv = step.kv
    batch, heads, new, dim = query.shape
    kv_heads = kv.prefix_k.shape[2]
    rep = heads // kv_heads
    q_per_group = step.rows_per_group
    n_groups = batch // q_per_group
    if step.groups is None:
        limit = step.groups_limit or kv.prefix_k.shape[1]
        prefix_k, prefix_v = kv.prefix_k[layer, :limit], kv.prefix_v[layer, :limit]
    else:
        prefix_k, prefix_v = kv.prefix_k[layer, step.groups], kv.prefix_v[layer, step.groups]
    if step.rows is None:  # every row of the layout (not the spare past it)
        suffix_k, suffix_v = kv.suffix_k[layer, :batch], kv.suffix_v[layer, :batch]
    else:
        suffix_k, suffix_v = kv.suffix_k[layer, step.rows], kv.suffix_v[layer, step.rows]
    prefix_k, prefix_v = _widen(prefix_k, query.dtype), _widen(prefix_v, query.dtype)
    suffix_k, suffix_v = _widen(suffix_k, query.dtype), _widen(suffix_v, query.dtype)
    # group-major queries: [G, Q, Hkv, rep, T, D] -> [G, Hkv, Q*rep*T, D] against the shared prefix
    q6 = query.view(n_groups, q_per_group, kv_heads, rep, new, dim)
    q_prefix = q6.permute(0, 2, 1, 3, 4, 5).reshape(n_groups, kv_heads, q_per_group * rep * new, dim)
    s_prefix = _scores(q_prefix, prefix_k, step.out_dtype_scores) * scaling
    s_prefix = s_prefix + step.prefix_bias
    p_len = s_prefix.shape[-1]
    s_prefix = s_prefix.view(n_groups, kv_heads, q_per_group, rep * new, p_len).permute(0, 2, 1, 3, 4)
    s_prefix = s_prefix.reshape(batch, kv_heads, rep * new, p_len)
    q_suffix = query.view(batch, kv_heads, rep * new, dim)
    s_suffix = _scores(q_suffix, suffix_k, step.out_dtype_scores) * scaling
    bias = step.suffix_bias
    if rep > 1 and new > 1:
        bias = bias.repeat(1, 1, rep, 1)  # query rows are ordered (rep, T)
    s_suffix = s_suffix + bias
    probs = torch.softmax(torch.cat([s_prefix, s_suffix], dim=-1), dim=-1)
    p_prefix = probs[..., :p_len].to(prefix_v.dtype)
    p_suffix = probs[..., p_len:].to(suffix_v.dtype)
    p_prefix = p_prefix.view(n_groups, q_per_group, kv_heads, rep * new, p_len).permute(0, 2, 1, 3, 4)
    p_prefix = p_prefix.reshape(n_groups, kv_heads, q_per_group * rep * new, p_len)
    out_prefix = torch.matmul(p_prefix, prefix_v)
    out_prefix = out_prefix.view(n_groups, kv_heads, q_per_group, rep * new, dim).permute(0, 2, 1, 3, 4)
    out = out_prefix.reshape(batch, kv_heads, rep * new, dim) + torch.matmul(p_suffix, suffix_v)
    return out.view(batch, heads, new, dim)


def _triton_rows_attention(step: AttentionStep, layer: int, query: torch.Tensor, scaling: float,
                           new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    from .triton_decode import decode_attention

    kv, limit = step.kv, step.groups_limit or step.kv.prefix_k.shape[1]
    if step.live is not None:  # compacted caption rows: every slot is addressable, the spare's included
        limit = kv.prefix_k.shape[1]
    out = decode_attention(
        query[:, :, 0], kv.prefix_k[layer, :limit], kv.prefix_v[layer, :limit], kv.suffix_k[layer], kv.suffix_v[layer],
        step.prefix_lengths, step.write_pos, step.rows_per_group, scaling, step.triton_splits, live=step.live,
        entries=step.entries, new_kv=new_kv,
    )
    return out[:, :, None]


def _triton_suffix_attention(step: AttentionStep, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    from .triton_suffix import suffix_prefill_attention

    kv = step.kv
    return suffix_prefill_attention(
        query, kv.prefix_k[layer], kv.prefix_v[layer], kv.suffix_k[layer], kv.suffix_v[layer],
        step.prefix_lengths, step.groups, step.rows, step.rows_per_group, scaling,
    )


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs: Any):
    """AttentionInterface entry point; returns ([B, T, H, D], None) like transformers' SDPA."""
    step: AttentionStep | None = kwargs.pop("dvl_step", None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if step.mode != "prefix":
        return _rows_step(module, step, query, key, value, scaling), None
    layer = module.layer_idx
    common = step.kv.common(layer) if step.kv is not None else None
    own = key.shape[2]
    if common is not None:  # stored in front of the group's own keys/values, as decode reads them
        key, value = _behind_common(common, key, value)
    if step.collect is not None:
        step.collect.append((key, value))
    else:
        _write_prefix(step, layer, key, value)
    if common is not None:
        return _after_common(query, key, value, own, scaling), None
    rep = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=rep > 1)
    return out.transpose(1, 2).contiguous(), None


def _after_common(query, keys, values, own: int, scaling: float) -> torch.Tensor:
    """Causal prefill of prompts whose first S tokens are the stored common head: keys and values
    are [head | own] (the last `own` positions computed now), and S zero queries in front make
    plain top-left causal attention (the fused kernels' fast case) let own token t see the whole
    head and own tokens 0..t. The S extra query rows cost (S+T)^2 - T^2 of attention work (~11%
    more for 32 of 616), their outputs dropped."""
    batch, heads, new, dim = query.shape
    size = keys.shape[2] - own
    queries = torch.cat([query.new_zeros(batch, heads, size, dim), query], dim=2)
    rep = heads // keys.shape[1]
    out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scaling, enable_gqa=rep > 1)
    return out[:, :, size:].transpose(1, 2).contiguous()


def _behind_common(common: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, values: torch.Tensor):
    """[B, Hkv, L, D] keys and values with the common head's S positions in front, in their dtype."""
    head_k, head_v = (_widen(t, keys.dtype)[None].expand(keys.shape[0], -1, -1, -1) for t in common)
    return torch.cat([head_k, keys], dim=2), torch.cat([head_v, values], dim=2)


@torch.compiler.disable
def _rows_step(module, step: AttentionStep, query, key, value, scaling: float) -> torch.Tensor:
    """Write the rows' new keys/values and attend, as [B, T, H, D].

    One opaque call inside a compiled decode forward: its indexed writes into the
    multi-GB cache and its Triton kernels stay eager, while the norms, rotary and MLP
    around it are what compiling fuses. The layer index is read here, not before the
    call, so the compiled pieces are shared by every layer instead of specialised per
    index (which would recompile past torch's limit of 8).
    """
    layer = module.layer_idx
    if _kernel_writes(step, query):  # the decode kernel stores the new keys/values itself
        out = _triton_rows_attention(step, layer, query, scaling, new_kv=(key[:, :, 0], value[:, :, 0]))
        return out.transpose(1, 2).contiguous()
    _write_rows(step, layer, key, value)
    return _rows_attention(step, layer, query, scaling).transpose(1, 2).contiguous()


def _kernel_writes(step: AttentionStep, query: torch.Tensor) -> bool:
    """Whether this step's attention is the compacted Triton decode kernel, which can store the
    new keys/values on its way (not into an fp8 cache, whose writes saturate in `to_cache`)."""
    return (
        step.live is not None and bool(step.triton_splits) and query.shape[2] == 1
        and (step.rows_per_group == 1 or step.entries is not None) and step.kv.suffix_k.dtype.itemsize > 1
    )


def register_slot_attention() -> None:
    """Make `ATTENTION_NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    except ImportError:  # older layouts: mask creation falls back to none, SDPA path unaffected
        pass


def route_attention(language_model) -> None:
    """Send a language model's attention through `slot_attention`.

    Calls without a `dvl_step` (transformers' `generate`) still get plain SDPA, so
    the same loaded model serves both engines.
    """
    register_slot_attention()
    language_model.config._attn_implementation = ATTENTION_NAME
