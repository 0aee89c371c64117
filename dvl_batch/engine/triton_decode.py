"""Decode attention over the two-level slot cache, as Triton kernels (CUDA).

One decode step is bound by reading keys and values. The portable torch path reads
every slot's full suffix capacity (max_new_tokens of mostly empty positions) and
materialises scores in several passes. These kernels read exactly the valid keys:
each group's prefix once for all of its Q rows (tensor-core dot of the Q queries
against a key tile), then each row's own suffix up to its current length, with an
online softmax in float32; a second kernel merges the partial results (split-K
"flash decoding", so small batches still fill the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_tile(q, k_base, v_base, pos, ok, stride_kp, stride_vp, m_i, l_i, acc, scale,
              D: tl.constexpr, IEEE: tl.constexpr, MMA: tl.constexpr):
    """One key tile of the online softmax on tensor cores: returns the updated (max, sum, acc)."""
    offs_d = tl.arange(0, D)
    k = tl.load(k_base + pos[:, None] * stride_kp + offs_d[None, :], mask=ok[:, None], other=0.0).to(MMA)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile must not make NaNs
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + pos[:, None] * stride_vp + offs_d[None, :], mask=ok[:, None], other=0.0).to(MMA)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(MMA), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(MMA), v)
    return m_new, l_i, acc


@triton.jit
def _fma_tile(q, k_base, v_base, pos, ok, stride_kp, stride_vp, m_i, l_i, acc, scale, D: tl.constexpr):
    """One key tile of the online softmax for a single query on CUDA cores, in float32."""
    offs_d = tl.arange(0, D)
    k = tl.load(k_base + pos[:, None] * stride_kp + offs_d[None, :], mask=ok[:, None], other=0.0)
    s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe)
    l_i = l_i * alpha + tl.sum(p, 0)
    v = tl.load(v_base + pos[:, None] * stride_vp + offs_d[None, :], mask=ok[:, None], other=0.0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
    return m_new, l_i, acc


@triton.jit
def _prefix_part(
    Q, PK, PV, ACC, M, L, g, row0, n_rows, h, plen, start, part,
    stride_qr, stride_qh, stride_kg, stride_kh, stride_kp, stride_vg, stride_vh, stride_vp,
    scale,
    HEADS: tl.constexpr, REP: tl.constexpr, QPAD: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTS: tl.constexpr, TILES: tl.constexpr, IEEE: tl.constexpr, MMA: tl.constexpr,
):
    """Partial attention of query rows row0..row0+n_rows-1 over positions start.. of group
    g's prefix (TILES tiles, valid below `plen`), stored as partial `part`.

    The dots run in MMA (the query dtype, or float16 for an fp8 cache: Hopper widens e4m3
    to float16 in one instruction, to bfloat16 only through float32; measured: the bf16
    widening held the fp8 kernel at ~2.1 TB/s); accumulation is float32 either way."""
    kvh = h // REP
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    qi = tl.arange(0, QPAD)
    rows = row0 + qi
    row_ok = qi < n_rows
    q = tl.load(Q + rows[:, None] * stride_qr + h * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if MMA == tl.float16:  # noqa: SIM300 - fp8 cache: keep a (rare) huge query component finite in float16
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0)
    q = q.to(MMA)
    m_i = tl.full([QPAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QPAD], tl.float32)
    acc = tl.zeros([QPAD, D], tl.float32)
    # loop bounds are compile-time tile counts; masked loads past the valid length move no data
    k_base = PK + g * stride_kg + kvh * stride_kh
    v_base = PV + g * stride_vg + kvh * stride_vh
    for tile in range(TILES):
        pos = start + tile * BLOCK_N + offs_n
        m_i, l_i, acc = _dot_tile(q, k_base, v_base, pos, pos < plen, stride_kp, stride_vp,
                                  m_i, l_i, acc, scale, D, IEEE, MMA)
    out = (rows * HEADS + h) * PARTS + part
    tl.store(M + out, m_i, mask=row_ok)
    tl.store(L + out, l_i, mask=row_ok)
    tl.store(ACC + out[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _row_part(
    Q, SK, SV, ACC, M, L, row, key_row, start, stop, part, h,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_kp, stride_vr, stride_vh, stride_vp,
    scale,
    HEADS: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr,
):
    """Partial attention of one query row over positions start..stop-1 of `key_row`'s keys,
    on CUDA cores in float32 (no tensor-core tile to fill), stored as partial `part`.

    Used for a row's own suffix (question + answer so far + new token: a dynamic bound, no
    tiles past the row's end) and, with `fma_prefix`, for a caption row's prefix split."""
    kvh = h // REP
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + row * stride_qr + h * stride_qh + offs_d).to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([D], tl.float32)
    k_base = SK + key_row * stride_kr + kvh * stride_kh
    v_base = SV + key_row * stride_vr + kvh * stride_vh
    for begin in range(start, stop, BLOCK_N):
        pos = begin + offs_n
        m_i, l_i, acc = _fma_tile(q, k_base, v_base, pos, pos < stop, stride_kp, stride_vp, m_i, l_i, acc, scale, D)
    out = (row * HEADS + h) * PARTS + part
    tl.store(M + out, m_i)
    tl.store(L + out, l_i)
    tl.store(ACC + out * D + offs_d, acc)


@triton.jit
def _decode_kernel(
    Q, PK, PV, PLEN, SK, SV, RLEN, LIVE, ENT_G, ENT_S, ENT_N, KN, VN, ACC, M, L,
    stride_qr, stride_qh, stride_kg, stride_kh, stride_kp, stride_vg, stride_vh, stride_vp,
    stride_skr, stride_skh, stride_skp, stride_svr, stride_svh, stride_svp, stride_knr, stride_knh, stride_vnr, stride_vnh,
    scale,
    HEADS: tl.constexpr, REP: tl.constexpr, Q_ROWS: tl.constexpr, QPAD: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, TILES: tl.constexpr, IEEE: tl.constexpr,
    SUFFIX_BLOCK_N: tl.constexpr, MMA: tl.constexpr, FMA_PREFIX: tl.constexpr, INDEXED: tl.constexpr,
    GROUPED: tl.constexpr, WRITE: tl.constexpr, PARTS: tl.constexpr,
):
    """One launch for all levels: programs 0..SPLITS-1 of axis 0 take prefix splits, the next
    Q_ROWS take the suffix of one of the group's rows each. Axis 0 varies fastest in the
    launch order, so the short, latency-bound suffix programs run beside the bandwidth-bound
    prefix programs instead of as a tail of their own (measured: a suffix kernel of its own
    took 136 us of a 590 us layer at 384 rows), and a VQA group's rows do not queue behind
    one another in one program.

    Axis 2 is entry b. Whole layout (neither flag): group b, rows b*Q_ROWS.. INDEXED (one-row
    groups): slot LIVE[b], query and output row b, so the grid holds only the step's live rows.
    GROUPED (groups of several rows): group ENT_G[b], whose live rows are batch rows
    ENT_S[b]..+ENT_N[b] (slots LIVE[...]); entries past the step's groups have ENT_N 0.

    WRITE: the step's new key and value of batch row r (KN/VN [r, kv head, D]) are stored at
    the row's suffix position RLEN by its suffix programs before they read the suffix (every
    head of a kv head stores the same values, so each program reads what it stored), which
    saves the two indexed writes per layer that would come before this kernel."""
    split = tl.program_id(0)  # the fastest grid axis: suffix programs interleave with prefix ones
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets of a multi-GB layer cache overflow 32 bits
    if GROUPED:
        g = tl.load(ENT_G + b).to(tl.int64)
        row0 = tl.load(ENT_S + b).to(tl.int64)
        n = tl.load(ENT_N + b).to(tl.int32)
    elif INDEXED:
        g = tl.load(LIVE + b).to(tl.int64)
        row0 = b
        n = 1
    else:
        g = b
        row0 = b * Q_ROWS
        n = Q_ROWS
    if split < SPLITS:
        start = split * (TILES * BLOCK_N)
        plen = tl.load(PLEN + g).to(tl.int32)
        if FMA_PREFIX:  # one row per group (captions): no 16-row tensor-core tile for one query
            _row_part(
                Q, PK, PV, ACC, M, L, row0, g, start, tl.minimum(plen, start + TILES * BLOCK_N), split, h,
                stride_qr, stride_qh, stride_kg, stride_kh, stride_kp, stride_vg, stride_vh, stride_vp, scale,
                HEADS, REP, D, BLOCK_N, PARTS,
            )
        elif n > 0:
            _prefix_part(
                Q, PK, PV, ACC, M, L, g, row0, n, h, plen, start, split,
                stride_qr, stride_qh, stride_kg, stride_kh, stride_kp, stride_vg, stride_vh, stride_vp, scale,
                HEADS, REP, QPAD, D, BLOCK_N, PARTS, TILES, IEEE, MMA,
            )
    elif split - SPLITS < n:
        row = row0 + split - SPLITS
        if GROUPED:
            key_row = tl.load(LIVE + row).to(tl.int64)
        elif INDEXED:
            key_row = g
        else:
            key_row = row
        rlen = tl.load(RLEN + key_row).to(tl.int32) + 1
        if WRITE:
            kvh = h // REP
            offs_d = tl.arange(0, D)
            new_k = tl.load(KN + row * stride_knr + kvh * stride_knh + offs_d)
            new_v = tl.load(VN + row * stride_vnr + kvh * stride_vnh + offs_d)
            at = (rlen - 1).to(tl.int64)
            tl.store(SK + key_row * stride_skr + kvh * stride_skh + at * stride_skp + offs_d, new_k.to(SK.dtype.element_ty))
            tl.store(SV + key_row * stride_svr + kvh * stride_svh + at * stride_svp + offs_d, new_v.to(SV.dtype.element_ty))
            tl.debug_barrier()  # the block's stores are visible to its own loads below
        _row_part(
            Q, SK, SV, ACC, M, L, row, key_row, 0, rlen, SPLITS, h,
            stride_qr, stride_qh, stride_skr, stride_skh, stride_skp, stride_svr, stride_svh, stride_svp, scale,
            HEADS, REP, D, SUFFIX_BLOCK_N, PARTS,
        )


@triton.jit
def _combine_kernel(ACC, M, L, OUT, stride_or, stride_oh, HEADS: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr,
                    PARTS_PAD: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    parts = tl.arange(0, PARTS_PAD)
    ok = parts < PARTS
    base = (row * HEADS + h) * PARTS
    m = tl.load(M + base + parts, mask=ok, other=float("-inf"))
    l_part = tl.load(L + base + parts, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(ok, tl.exp(m - m_max), 0.0)
    total = tl.sum(l_part * weight, 0)
    offs_d = tl.arange(0, D)
    acc = tl.load(ACC + (base + parts)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / total
    tl.store(OUT + row * stride_or + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the decode kernels (chosen by measurement, see benchmarks/profile_engine.py)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    suffix_block_n: int = 32
    fma_prefix: bool = False  # one-row groups: prefix on CUDA cores instead of a 16-row dot


DEFAULT_CONFIG = KernelConfig()
# One-row groups (captions) over an fp8 cache: the prefix on CUDA cores, 128 keys a tile, two
# warps. Measured on the H200 at 1651 rows (profile_engine.py --sections attn_fp8): 3.11 TB/s,
# against 2.13 TB/s for the 16-row dot of DEFAULT_CONFIG (the best of 54 configurations).
FP8_ONE_ROW_CONFIG = KernelConfig(block_n=128, num_warps=2, num_stages=2, fma_prefix=True)
# One-row groups over a bf16 cache: 128 keys a tile. Measured on the H200 (profile_engine.py
# --sections attn): 3.31 TB/s at 384 rows and 3.82 TB/s at 768 (the copy's bandwidth), against
# 3.13 and 3.49 for DEFAULT_CONFIG; the CUDA-core loop is slower on bf16 (2.8-3.3 TB/s).
BF16_ONE_ROW_CONFIG = KernelConfig(block_n=128, num_warps=4, num_stages=2)


def default_config(cache_dtype: torch.dtype, rows_per_group: int) -> KernelConfig:
    """The measured best launch parameters for this cache type and group shape. VQA groups of
    several rows and float32 caches keep DEFAULT_CONFIG (a 128-key float32 tile needs ~147 KB
    of shared memory, more than Ada's ~99 KB; the 64-key one fits)."""
    if rows_per_group != 1:
        return DEFAULT_CONFIG
    if cache_dtype.itemsize == 1:
        return FP8_ONE_ROW_CONFIG
    return BF16_ONE_ROW_CONFIG if cache_dtype.itemsize == 2 else DEFAULT_CONFIG


def decode_attention(
    query: torch.Tensor,  # [R, H, D] (with `live`: [B, H, D], row b for slot live[b])
    prefix_k: torch.Tensor,  # [G, Hkv, P, D]
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,  # [R, Hkv, Ls, D]
    suffix_v: torch.Tensor,
    prefix_len: torch.Tensor,  # [G] valid prefix positions per group
    row_len: torch.Tensor,  # [R] position of the token just written (valid suffix = row_len + 1)
    rows_per_group: int,
    scale: float,
    splits: int,
    config: KernelConfig | None = None,
    live: torch.Tensor | None = None,  # [B] slots of the batch's rows
    entries: torch.Tensor | None = None,  # [3, E] (group, first batch row, rows) per group: groups of > 1 row
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([B, Hkv, D] keys, values) to store first
) -> torch.Tensor:
    """Attention output [R, H, D] (or [B, H, D]) of one new token per row over
    [group prefix | own suffix].

    A compacted batch (`live`) of one-row groups needs nothing else; one of larger groups also
    needs `entries` (`group_entries`): each group's live rows are consecutive batch rows, and
    its prefix is read once for all of them."""
    cfg = config or default_config(prefix_k.dtype, rows_per_group)
    rows, heads, dim = query.shape
    grouped = entries is not None
    assert live is not None or not grouped, "group entries index a compacted batch: pass its live rows too"
    if live is not None:
        assert live.shape[0] == rows and (grouped or rows_per_group == 1), "a compacted batch of groups needs entries"
    grid_groups = entries.shape[1] if grouped else rows // rows_per_group
    rep = heads // prefix_k.shape[1]
    for tensor in (prefix_k, prefix_v, suffix_k, suffix_v):
        assert tensor.stride(-1) == 1, "keys/values must be contiguous in head_dim"
    assert query.stride(-1) == 1
    parts = splits + 1
    acc, m, l_sum = _partials(rows, heads, parts, dim, query.device)
    index = live if live is not None else row_len  # (unread without INDEXED / GROUPED)
    ent = entries if grouped else (index, index, index)  # (unread without GROUPED: no fill kernel per call)
    if new_kv is not None:
        assert suffix_k.dtype.itemsize > 1, "an fp8 cache takes its keys through to_cache (saturating), not here"
        assert new_kv[0].shape[0] == rows and new_kv[1].shape == new_kv[0].shape
    new_k, new_v = (t if t.stride(-1) == 1 else t.contiguous() for t in new_kv) if new_kv is not None else (query, query)
    _decode_kernel[(splits + rows_per_group, heads, grid_groups)](
        query, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, row_len, index, ent[0], ent[1], ent[2],
        new_k, new_v, acc, m, l_sum,
        query.stride(0), query.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2),
        suffix_v.stride(0), suffix_v.stride(1), suffix_v.stride(2),
        new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        scale,
        HEADS=heads, REP=rep, Q_ROWS=rows_per_group, QPAD=max(16, triton.next_power_of_2(rows_per_group)), D=dim,
        BLOCK_N=cfg.block_n, SPLITS=splits, TILES=triton.cdiv(triton.cdiv(prefix_k.shape[2], splits), cfg.block_n),
        IEEE=query.dtype == torch.float32, SUFFIX_BLOCK_N=cfg.suffix_block_n, MMA=_mma_type(query, prefix_k),
        FMA_PREFIX=cfg.fma_prefix and rows_per_group == 1, INDEXED=live is not None and not grouped, GROUPED=grouped,
        WRITE=new_kv is not None, PARTS=parts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _combine(acc, m, l_sum, query.dtype)


def _partials(count: int, heads: int, parts: int, dim: int, device: torch.device):
    """Per (row, head, part): the float32 accumulator and softmax max and sum the kernels fill."""
    acc = torch.empty(count, heads, parts, dim, dtype=torch.float32, device=device)
    m = torch.empty(count, heads, parts, dtype=torch.float32, device=device)
    return acc, m, torch.empty_like(m)


def _combine(acc: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[count, heads, dim] in `dtype`: the parts of every (row, head) merged in one softmax."""
    count, heads, parts, dim = acc.shape
    out = torch.empty(count, heads, dim, dtype=dtype, device=acc.device)
    _combine_kernel[(count, heads)](
        acc, m, l_sum, out, out.stride(0), out.stride(1),
        HEADS=heads, D=dim, PARTS=parts, PARTS_PAD=triton.next_power_of_2(parts),
    )
    return out


def _mma_type(query: torch.Tensor, keys: torch.Tensor):
    """The dtype the prefix dots run in: float16 over an fp8 cache (float32 queries stay
    float32, the exact reference path), else the queries'."""
    if keys.dtype.itemsize == 1 and query.dtype != torch.float32:
        return tl.float16
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[query.dtype]


def choose_splits(groups: int, heads: int, sm_count: int) -> int:
    """Enough prefix splits that the grid covers every SM a few times over."""
    splits = 1
    while groups * heads * (splits + 1) < 4 * sm_count and splits < 16:
        splits *= 2
    return splits
