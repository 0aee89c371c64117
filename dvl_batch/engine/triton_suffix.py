"""Suffix prefill attention over the two-level slot cache, as Triton kernels (CUDA).

A VQA group's question tokens (Q questions x T tokens) attend to the group's shared
prefix and to their own causal suffix. The eager torch path materialises float32 scores
of every question token against the whole prefix; here the prefix is read once per tile
of a group's question tokens (`_shared_prefix_kernel`) and each token's own suffix by a
row program (`_suffix_tokens_kernel`), merged like the decode kernel's split parts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import (
    DEFAULT_CONFIG,
    KernelConfig,
    _combine,
    _mma_type,
    _partials,
    _prefix_part,
    _row_part,
    choose_splits,
)


@triton.jit
def _shared_prefix_kernel(
    Q, PK, PV, PLEN, GROUPS, ACC, M, L,
    stride_qr, stride_qh, stride_kg, stride_kh, stride_kp, stride_vg, stride_vh, stride_vp,
    scale, group_rows, tiles_m,
    HEADS: tl.constexpr, REP: tl.constexpr, QPAD: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, TILES: tl.constexpr, IEEE: tl.constexpr, MMA: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Suffix prefill, prefix level: all query tokens of a group (its Q questions x T tokens,
    `group_rows`, in tiles of QPAD) against one split of the group's prefix, read once per
    tile instead of once per question token. Axis 2 is (group in batch, row tile); the
    token counts are run-time values, so varying question lengths compile nothing new."""
    split = tl.program_id(0)
    h = tl.program_id(1)
    gb = (tl.program_id(2) // tiles_m).to(tl.int64)
    tile = tl.program_id(2) % tiles_m
    g = tl.load(GROUPS + gb)
    row0 = gb * group_rows + tile * QPAD
    n_rows = tl.minimum(QPAD, group_rows - tile * QPAD)
    _prefix_part(
        Q, PK, PV, ACC, M, L, g, row0, n_rows, h, tl.load(PLEN + g).to(tl.int32), split * (TILES * BLOCK_N), split,
        stride_qr, stride_qh, stride_kg, stride_kh, stride_kp, stride_vg, stride_vh, stride_vp, scale,
        HEADS, REP, QPAD, D, BLOCK_N, PARTS, TILES, IEEE, MMA,
    )


@triton.jit
def _suffix_tokens_kernel(
    Q, SK, SV, ROWS, ACC, M, L,
    stride_qr, stride_qh, stride_skr, stride_skh, stride_skp, stride_svr, stride_svh, stride_svp,
    scale, tokens, part,
    HEADS: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr,
):
    """Suffix prefill, row level: query token t of batch row r against positions 0..t of
    that row's own suffix (causal), the row's slot given by ROWS, stored as partial `part`."""
    vrow = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    key_row = tl.load(ROWS + vrow // tokens)
    _row_part(
        Q, SK, SV, ACC, M, L, vrow, key_row, 0, vrow % tokens + 1, part, h,
        stride_qr, stride_qh, stride_skr, stride_skh, stride_skp, stride_svr, stride_svh, stride_svp, scale,
        HEADS, REP, D, BLOCK_N, PARTS,
    )


SUFFIX_ROW_TILE = 64  # query tokens per prefix-level program of the suffix prefill


def suffix_prefill_attention(
    query: torch.Tensor,  # [B, H, T, D], rows group-major (rows_per_group per group)
    prefix_k: torch.Tensor,  # [G_all, Hkv, P, D]
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,  # [R_all, Hkv, Ls, D]: the T new tokens already written at 0..T-1
    suffix_v: torch.Tensor,
    prefix_len: torch.Tensor,  # [G_all]
    groups: torch.Tensor,  # [B // rows_per_group] the batch's group slots
    rows: torch.Tensor,  # [B] the batch's row slots
    rows_per_group: int,
    scale: float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Attention output [B, H, T, D] of question tokens over [group prefix | own causal suffix].

    The eager torch path materialises float32 scores of every question token against the
    whole prefix (launch- and memory-bound: 2.6 ms per image measured for 5 questions);
    here each group's prefix is read once per tile of its questions' tokens."""
    cfg = config or DEFAULT_CONFIG
    batch, heads, new, dim = query.shape
    n_groups = batch // rows_per_group
    rep = heads // prefix_k.shape[1]
    flat = query.transpose(1, 2).reshape(batch * new, heads, dim)  # virtual rows (row, token)
    group_rows = rows_per_group * new
    qpad = min(SUFFIX_ROW_TILE, max(16, triton.next_power_of_2(group_rows)))
    tiles_m = triton.cdiv(group_rows, qpad)
    sm_count = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 132
    splits = choose_splits(n_groups * tiles_m, heads, sm_count)
    parts = splits + 1
    acc, m, l_sum = _partials(batch * new, heads, parts, dim, query.device)
    _shared_prefix_kernel[(splits, heads, n_groups * tiles_m)](
        flat, prefix_k, prefix_v, prefix_len, groups, acc, m, l_sum,
        flat.stride(0), flat.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
        scale, group_rows, tiles_m,
        HEADS=heads, REP=rep, QPAD=qpad, D=dim, BLOCK_N=cfg.block_n,
        SPLITS=splits, TILES=triton.cdiv(triton.cdiv(prefix_k.shape[2], splits), cfg.block_n),
        IEEE=query.dtype == torch.float32, MMA=_mma_type(query, prefix_k),
        PARTS=parts,
        num_warps=8 if qpad >= 64 else cfg.num_warps, num_stages=cfg.num_stages,
    )
    _suffix_tokens_kernel[(batch * new, heads)](
        flat, suffix_k, suffix_v, rows, acc, m, l_sum,
        flat.stride(0), flat.stride(1),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2),
        suffix_v.stride(0), suffix_v.stride(1), suffix_v.stride(2),
        scale, new, splits,
        HEADS=heads, REP=rep, D=dim, BLOCK_N=min(64, max(16, triton.next_power_of_2(new))), PARTS=parts,
        num_warps=cfg.num_warps,
    )
    return _combine(acc, m, l_sum, query.dtype).view(batch, new, heads, dim).transpose(1, 2)
