"""Attention statistics in Triton: QK^T recomputed tile by tile and reduced on the spot, P never written.

One program per (query tile, batch row, head). Pass 1 streams the key tiles and keeps, per row, the running
max m (log2 units), l = sum 2^(t - m) and a = sum 2^(t - m) (t - m), so that

    lse2 = m + log2 l,   max p = 1 / l,   H = ln 2 * (log2 l - a / l)     (t = s * log2 e)

When the caller has the log-sum-exp from the forward attention (``lse``), pass 1 is skipped: lse2 = lse * log2 e,
and pass 2 also sums H = lse - sum_j p s = -ln 2 * sum_j p (t - lse2) (written around lse, no cancellation) and max p.

Pass 2 streams the key tiles again, forms p = 2^(t - lse2) and reduces each tile into every statistic declared in
``stats.py``; the per-row vectors go to one [V, B, H, L] float32 output, each at its declared slot. Both passes
split the key tiles of a query tile into off-band tiles, where every (row, key) pair is allowed (no mask; no
diagonal, previous-token, sink or final-row term can fall there), and on-band tiles (the diagonal band, the sink
column, window edges, padding), which carry the masks and those terms.

Histograms: relaxed global atomic adds of 1 per pair, no ``tl.histogram`` (triton 3.6 lowers a 4096-bin
``tl.histogram`` to ~40,000 ballot/popcount instructions a tile, and its register accumulators spill). The log10
histogram adds every allowed pair; the linear one only pairs with p >= 1/NB, and only in tiles whose max p reaches
that (long-range tiles usually do not): bin 0 is the allowed-pair count minus the pairs added elsewhere, added once
per program. Both are exact, so the KDE's error bound (``kernels/kde.py``: half a bin of 1/NB) is unchanged.
Attention received: relaxed atomic add per key, and an int32 atomic max on the bit pattern of p (p >= 0, so the
integer order is the float order). Distance buckets and the thumbnail loop over the few buckets and key cells a
tile spans. GQA reads key head h // group; keys are never repeated. References: Triton tutorial 06-fused-attention
(online softmax in exp2, off-band/on-band split, LSE recompute in the backward), ``reference.attn_stats_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import stats
from ._settings import check_interpreter, is_interpreter, qk_stats_settings
from .contract import (
    AttnStatsSpec,
    KeyRanges,
    previous_tokens,
    resolve_tokens,
    thumb_layout,
    validate_lse,
    validate_qk,
)

__all__ = ["qk_stats"]

_LOG2E = 1.4426950408889634  # used by the launcher only
# constants read inside @triton.jit code must be constexpr globals (a plain float compiles to a NameError)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG10_2 = tl.constexpr(0.30102999566398120)
_N_DIST = tl.constexpr(stats.N_DIST_BUCKETS)
# the slots of the [V, B, H, L] vector output, from the declaration
_DIAG = tl.constexpr(stats.DIAG.slot)
_FINAL = tl.constexpr(stats.FINAL.slot)
_ENTROPY = tl.constexpr(stats.ENTROPY.slot)
_ROWMAX = tl.constexpr(stats.ROWMAX.slot)
_RECV_SUM = tl.constexpr(stats.RECV_SUM.slot)
_RECV_MAX = tl.constexpr(stats.RECV_MAX.slot)
_SINK = tl.constexpr(stats.SINK.slot)
_PREV = tl.constexpr(stats.PREV.slot)
_DUP = tl.constexpr(stats.DUP.slot)
_INDUCTION = tl.constexpr(stats.INDUCTION.slot)


@triton.jit
def _floor_log2(x):
    """floor(log2(x)) of positive integers below 2^24, exactly, from the float32 exponent."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return (bits >> 23) - 127


@triton.jit
def _vec_row(VEC, SLOT: tl.constexpr, slot_stride, vec_row):
    """The (b, h) row of statistic ``SLOT`` in the [V, B, H, L] vector output."""
    return VEC + SLOT * slot_stride + vec_row


@triton.jit
def _scores(
    q,
    k_base,
    stride_kn,
    offs_n,
    offs_d,
    L,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    MASKED: tl.constexpr,
):
    """q . k for every (row, key) pair of one key tile; keys past L read as zero on masked tiles only."""
    ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
    if MASKED:
        k = tl.load(ptrs, mask=(offs_n < L)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM == HEAD_DIM_PAD:
        k = tl.load(ptrs)
    else:
        k = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    return qk


@triton.jit
def _pass1_tile(m_i, l_i, a_i, t, allowed, MASKED: tl.constexpr):
    """Online update of the running max m, l = sum 2^(t - m) and a = sum 2^(t - m) (t - m) by one tile."""
    if MASKED:
        t = tl.where(allowed, t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    m_old = tl.where(m_i == float("-inf"), m_safe, m_i)
    alpha = tl.exp2(m_old - m_safe)
    e = tl.exp2(t - m_safe[:, None])  # masked -> 0
    d = t - m_safe[:, None]
    if MASKED:
        d = tl.where(allowed, d, 0.0)
    # -- update m_i, l_i, a_i --
    a_i = alpha * (a_i + (m_old - m_safe) * l_i) + tl.sum(e * d, 1)
    l_i = alpha * l_i + tl.sum(e, 1)
    return m_new, l_i, a_i


@triton.jit
def _pass2_tile(
    acc,
    t,
    allowed,
    offs_m,
    offs_n,
    lse2,
    tq,
    rc,
    bucket_ids,
    start,
    m_lo,
    is_final,
    HIST_ALL,
    HIST_LOG,
    VEC,
    slot_stride,
    THUMB,
    CELL,
    TOK,
    TOKB,
    tok_row,
    vec_row,
    hist_row,
    thumb_row,
    R,
    L,
    NB: tl.constexpr,
    log_min,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LSE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Reduce one tile of p into every statistic; ``acc`` is the tuple of per-program accumulators."""
    s1, s2, diag, prev, sink, dup, ind, dist, n_ok, n_hi, pt, pmax = acc
    lp2 = t - lse2[:, None]  # log2 p
    if MASKED:
        p = tl.where(allowed, tl.exp2(lp2), 0.0)
        key_ok = offs_n < L
    else:
        p = tl.exp2(lp2)
    # -- moments, and the entropy and row max when pass 1 was skipped --
    s1 += tl.sum(p, 1)
    s2 += tl.sum(p * p, 1)
    if HAS_LSE:
        pt += tl.sum(p * lp2, 1)
        pmax = tl.maximum(pmax, tl.max(p, 1))
    # -- histograms: relaxed atomics; linear bin 0 is filled in from the counts at the end --
    col_max = tl.max(p, 0)  # [BN]
    lg = ((lp2 * _LOG10_2 - log_min) * (NB / -log_min)).to(tl.int32)  # truncation = floor for x >= 0
    lg = tl.minimum(tl.maximum(lg, 0), NB - 1)
    if MASKED:
        tl.atomic_add(HIST_LOG + hist_row + lg, 1, mask=allowed, sem="relaxed")
        n_ok += tl.sum(tl.sum(allowed.to(tl.int32), 1), 0)
    else:
        tl.atomic_add(HIST_LOG + hist_row + lg, 1, sem="relaxed")
        n_ok += BLOCK_M * BLOCK_N
    if tl.max(col_max, 0) * NB >= 1.0:  # a tile all under one linear bin adds only to bin 0
        lin = tl.minimum((p * NB).to(tl.int32), NB - 1)  # masked pairs: p = 0, bin 0
        tl.atomic_add(HIST_ALL + hist_row + lin, 1, mask=lin > 0, sem="relaxed")
        n_hi += tl.sum(tl.sum((lin > 0).to(tl.int32), 1), 0)
    # -- attention received: the max is an int32 atomic max on the bits of p (p >= 0, so the integer order is the
    # float order), through the recv_max row cast to an int32 pointer here: one pointer covers the whole output, and
    # no int32 alias of it has to travel through the signature next to the float32 one --
    recv_sum = _vec_row(VEC, _RECV_SUM, slot_stride, vec_row) + offs_n
    recv_max = _vec_row(VEC, _RECV_MAX, slot_stride, vec_row).to(tl.pointer_type(tl.int32)) + offs_n
    if MASKED:
        tl.atomic_add(recv_sum, tl.sum(p, 0), mask=key_ok, sem="relaxed")
        tl.atomic_max(recv_max, col_max.to(tl.int32, bitcast=True), mask=key_ok, sem="relaxed")
    else:
        tl.atomic_add(recv_sum, tl.sum(p, 0), sem="relaxed")
        tl.atomic_max(recv_max, col_max.to(tl.int32, bitcast=True), sem="relaxed")
    # -- head-role masses: earlier keys holding the query's token, or following it --
    if MASKED:
        tk = tl.load(TOK + tok_row + offs_n, mask=key_ok, other=-3)  # [BN]
        tkb = tl.load(TOKB + tok_row + offs_n, mask=key_ok, other=-3)  # [BN]
    else:
        tk = tl.load(TOK + tok_row + offs_n)
        tkb = tl.load(TOKB + tok_row + offs_n)
    dj = offs_m[:, None] - offs_n[None, :]  # [BM, BN] distance i - j
    if MASKED:
        # -- values on fixed diagonals and columns: only on-band tiles hold them --
        diag += tl.sum(tl.where(dj == 0, p, 0.0), 1)
        prev += tl.sum(tl.where(dj == 1, p, 0.0), 1)
        sink += tl.sum(tl.where(offs_n[None, :] == start, p, 0.0), 1)
        earlier = dj > 0
        dup += tl.sum(tl.where(earlier & (tq[:, None] == tk[None, :]), p, 0.0), 1)
        ind += tl.sum(tl.where(earlier & (tq[:, None] == tkb[None, :]), p, 0.0), 1)
        fin = tl.sum(tl.where(is_final[:, None], p, 0.0), 0)  # [BN] the final row, if in this tile
        n_final = tl.sum(is_final.to(tl.int32), 0)  # 1 when the final row is in this tile
        final = _vec_row(VEC, _FINAL, slot_stride, vec_row) + offs_n
        tl.store(final, fin, mask=key_ok & (tl.zeros([BLOCK_N], tl.int32) + n_final > 0))
        k_lo = _floor_log2(tl.min(tl.min(tl.where(allowed, dj, 1 << 24), 1), 0) + 1)
        k_hi = _floor_log2(tl.max(tl.max(tl.where(allowed, dj, -1), 1), 0) + 1)  # -127 with no allowed pair
    else:
        dup += tl.sum(tl.where(tq[:, None] == tk[None, :], p, 0.0), 1)
        ind += tl.sum(tl.where(tq[:, None] == tkb[None, :], p, 0.0), 1)
        n0 = tl.min(offs_n, 0)
        k_lo = _floor_log2(m_lo - (n0 + BLOCK_N - 1) + 1)
        k_hi = _floor_log2(m_lo + BLOCK_M - 1 - n0 + 1)
    # -- distance buckets floor(log2(i - j + 1)): a tile spans few of them --
    for kb in range(k_lo, k_hi + 1):
        in_kb = (dj + 1 >= (1 << kb)) & (dj + 1 < (2 << kb))  # floor(log2(i - j + 1)) == kb
        mass = tl.sum(tl.sum(tl.where(in_kb, p, 0.0), 1), 0)
        dist = tl.where(bucket_ids == kb, dist + mass, dist)
    # -- thumbnail: sum p over each key cell the tile spans (cells are contiguous runs of keys), per row --
    if MASKED:
        cc = tl.load(CELL + tok_row + offs_n, mask=key_ok, other=-1)
        c_lo = tl.min(tl.where(cc >= 0, cc, 1 << 30), 0)
    else:
        cc = tl.load(CELL + tok_row + offs_n)
        c_lo = tl.min(cc, 0)
    c_hi = tl.max(cc, 0)
    for c in range(c_lo, c_hi + 1):
        cell_sum = tl.sum(tl.where(cc[None, :] == c, p, 0.0), 1)  # [BM]
        if MASKED:
            tl.atomic_add(THUMB + thumb_row + rc * R + c, cell_sum, mask=rc >= 0, sem="relaxed")
        else:
            tl.atomic_add(THUMB + thumb_row + rc * R + c, cell_sum, sem="relaxed")
    return s1, s2, diag, prev, sink, dup, ind, dist, n_ok, n_hi, pt, pmax


@triton.jit
def _qk_stats_fused_kernel(
    HIST_ALL,
    HIST_LOG,  # [B, H, NB] int32 (atomic add)
    MOM,  # [B, H, 2] float64: sum p, sum p^2 (atomic add)
    DIST,  # [B, H, N_DIST_BUCKETS] float64 (atomic add)
    THUMB,  # [B, H, R, R] float32 sums of p per cell (atomic add)
    VEC,  # [V, B, H, L] float32 vectors by slot: query-axis ones stored, key-axis ones zeroed (atomics, final row)
    stride_vs,  # B * H * L, between slots
    Q,
    stride_qb,
    stride_qh,
    stride_qm,  # [B, H, L, D]
    K,
    stride_kb,
    stride_kh,
    stride_kn,  # [B, H_kv, L, D]
    LSE,  # [B, H, L] float32 natural log-sum-exp of each row (read when HAS_LSE)
    START,
    END,  # [B] int64 key ranges
    CELL,  # [B, L] int32 thumbnail cell of each position (-1: padding)
    TOK,  # [B, L] int64 token ids
    TOKB,  # [B, L] int64 token j - 1 at key j (-1 where j - 1 is not a real token)
    L,
    H,
    GROUP,
    WINDOW,
    R,
    qk_scale,
    log_min,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    """Every attention statistic of one (query tile, batch row, head); see the module docstring."""
    tl.static_assert(BLOCK_N >= 16 and BLOCK_M >= 16)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    start = tl.load(START + b).to(tl.int32)
    end = tl.load(END + b).to(tl.int32)
    bh = pid_bh.to(tl.int64)
    vec_row = bh * L  # offset of this (b, h) in the [B, H, L] vectors (and in each slot of VEC)
    slot_stride = stride_vs.to(tl.int64)
    tok_row = b.to(tl.int64) * L  # offset of this b in the [B, L] inputs
    hist_row = bh * NB

    m_lo = pid_m * BLOCK_M
    offs_m = m_lo + tl.arange(0, BLOCK_M)  # [BM] absolute query positions (int32: L < 2^24)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = (offs_m >= start) & (offs_m < end)
    lo_row = tl.zeros([BLOCK_M], dtype=tl.int32) + start
    if WINDOW > 0:
        lo_row = tl.maximum(lo_row, offs_m - WINDOW + 1)
    q = tl.load(
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_m[:, None].to(tl.int64) * stride_qm
        + offs_d[None, :],
        mask=(offs_m < L)[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter's tl.dot mishandles bfloat16; the compiled kernel keeps the bf16 dot
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh

    # -- key tiles: [k_begin, u_lo) and [u_hi, k_end) on-band (masked), [u_lo, u_hi) off-band (no mask) --
    m_hi = m_lo + BLOCK_M
    k_end = tl.minimum(m_hi, end)
    k_begin = start
    if WINDOW > 0:
        k_begin = tl.maximum(start, m_lo - WINDOW + 1)
    k_begin = (k_begin // BLOCK_N) * BLOCK_N
    # off-band: every row real, no final row, keys past the sink column and at least 2 before the first row
    u_lo = (start // BLOCK_N + 1) * BLOCK_N
    if WINDOW > 0:
        u_lo = tl.maximum(u_lo, tl.cdiv(tl.maximum(m_hi - WINDOW, 0), BLOCK_N) * BLOCK_N)
    u_lo = tl.maximum(u_lo, k_begin)
    u_hi = (tl.maximum(m_lo - 1, 0) // BLOCK_N) * BLOCK_N
    if (m_lo < start) | (m_hi >= end) | (u_hi <= u_lo):  # no off-band tile: one masked range
        u_lo = k_end
        u_hi = k_end
    # the masked tiles [k_begin, u_lo) and [u_hi, k_end) run in one loop (one copy of the masked code)
    n_first = tl.cdiv(u_lo - k_begin, BLOCK_N)
    n_masked = n_first + tl.cdiv(k_end - u_hi, BLOCK_N)

    if HAS_LSE:
        lse_in = tl.load(LSE + vec_row + offs_m, mask=row_ok, other=0.0)
        lse2 = tl.where(row_ok, lse_in * 1.4426950408889634, 0.0)
    else:
        # -- pass 1: running max, sum and sum(e * (t - m)) per row --
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        a_i = tl.zeros([BLOCK_M], tl.float32)
        for it in range(0, n_masked):
            n0 = k_begin + it * BLOCK_N + (it >= n_first).to(tl.int32) * (u_hi - u_lo)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            qk = _scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, True)
            allowed = row_ok[:, None] & (offs_n[None, :] >= lo_row[:, None]) & (offs_n[None, :] <= offs_m[:, None])
            m_i, l_i, a_i = _pass1_tile(m_i, l_i, a_i, qk * qk_scale, allowed, True)
        for n0 in range(u_lo, u_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            qk = _scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, False)
            m_i, l_i, a_i = _pass1_tile(m_i, l_i, a_i, qk * qk_scale, row_ok[:, None], False)
        valid = row_ok & (l_i > 0)
        l_safe = tl.where(valid, l_i, 1.0)
        lse2 = tl.where(valid, m_i + tl.log2(l_safe), 0.0)
        ent = tl.where(valid, _LN2 * (tl.log2(l_safe) - a_i / l_safe), 0.0)
        rowmax = tl.where(valid, 1.0 / l_safe, 0.0)

    # -- pass 2: p tile by tile, reduced into every statistic --
    zm = tl.zeros([BLOCK_M], tl.float32)
    acc = (zm, zm, zm, zm, zm, zm, zm, tl.zeros([_N_DIST], tl.float32), 0, 0, zm, zm)
    tq = tl.load(TOK + tok_row + offs_m, mask=offs_m < L, other=-2)  # [BM] query tokens
    rc = tl.load(CELL + tok_row + offs_m, mask=offs_m < L, other=-1)  # [BM] thumbnail row cells
    thumb_row = bh * R * R
    bucket_ids = tl.arange(0, _N_DIST)
    is_final = offs_m == end - 1
    for it in range(0, n_masked):
        n0 = k_begin + it * BLOCK_N + (it >= n_first).to(tl.int32) * (u_hi - u_lo)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        qk = _scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, True)
        allowed = row_ok[:, None] & (offs_n[None, :] >= lo_row[:, None]) & (offs_n[None, :] <= offs_m[:, None])
        acc = _pass2_tile(
            acc, qk * qk_scale, allowed, offs_m, offs_n, lse2, tq, rc, bucket_ids, start, m_lo, is_final,
            HIST_ALL, HIST_LOG, VEC, slot_stride, THUMB, CELL, TOK, TOKB, tok_row, vec_row, hist_row,
            thumb_row, R, L, NB, log_min, BLOCK_M, BLOCK_N, HAS_LSE, True,
        )  # fmt: skip
    for n0 in range(u_lo, u_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        qk = _scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, False)
        acc = _pass2_tile(
            acc, qk * qk_scale, row_ok[:, None], offs_m, offs_n, lse2, tq, rc, bucket_ids, start, m_lo, is_final,
            HIST_ALL, HIST_LOG, VEC, slot_stride, THUMB, CELL, TOK, TOKB, tok_row, vec_row, hist_row,
            thumb_row, R, L, NB, log_min, BLOCK_M, BLOCK_N, HAS_LSE, False,
        )  # fmt: skip
    s1, s2, diag, prev, sink, dup, ind, dist, n_ok, n_hi, pt, pmax = acc
    if HAS_LSE:
        ent = tl.where(row_ok, -_LN2 * pt, 0.0)
        rowmax = tl.where(row_ok, pmax, 0.0)

    # -- write the per-row vectors (every element of the tile), then the accumulators --
    rmask = offs_m < L
    tl.store(_vec_row(VEC, _DIAG, slot_stride, vec_row) + offs_m, diag, mask=rmask)
    tl.store(_vec_row(VEC, _PREV, slot_stride, vec_row) + offs_m, prev, mask=rmask)
    tl.store(_vec_row(VEC, _DUP, slot_stride, vec_row) + offs_m, dup, mask=rmask)
    tl.store(_vec_row(VEC, _INDUCTION, slot_stride, vec_row) + offs_m, ind, mask=rmask)
    tl.store(_vec_row(VEC, _SINK, slot_stride, vec_row) + offs_m, sink, mask=rmask)
    tl.store(_vec_row(VEC, _ENTROPY, slot_stride, vec_row) + offs_m, ent, mask=rmask)
    tl.store(_vec_row(VEC, _ROWMAX, slot_stride, vec_row) + offs_m, rowmax, mask=rmask)
    tl.atomic_add(HIST_ALL + hist_row, n_ok - n_hi, sem="relaxed")  # linear bin 0: every pair not added above
    tl.atomic_add(MOM + bh * 2, tl.sum(s1, 0).to(tl.float64), sem="relaxed")
    tl.atomic_add(MOM + bh * 2 + 1, tl.sum(s2, 0).to(tl.float64), sem="relaxed")
    tl.atomic_add(DIST + bh * _N_DIST + bucket_ids, dist.to(tl.float64), sem="relaxed")


def _check(q: torch.Tensor, k: torch.Tensor, ranges: KeyRanges) -> None:
    if not (q.is_cuda or is_interpreter()):
        raise ValueError("qk_stats runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
    validate_qk(q, k, ranges)


def _pairs(ranges: KeyRanges) -> torch.Tensor:
    """Allowed (query, key) pairs per batch row, in closed form: sum over queries of their key counts."""
    n = (ranges.end - ranges.start).clamp_min(0).double()  # [B]
    if ranges.window is None:
        return n * (n + 1) / 2
    w = float(ranges.window)
    full = torch.clamp(n - w, min=0)  # queries whose window is full
    head = n - full  # queries 0..min(n, w)-1 see i + 1 keys
    return head * (head + 1) / 2 + full * w


def qk_stats(
    q: torch.Tensor,  # [B, H, L, D]
    k: torch.Tensor,  # [B, H_kv, L, D]
    scaling: float,
    ranges: KeyRanges,
    spec: AttnStatsSpec = AttnStatsSpec(),
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    poison: bool = False,
    tokens: torch.Tensor | None = None,  # [B, L] token ids for the head-role masses (None: no repeats)
    lse: torch.Tensor | None = None,  # [B, H, L] float32 natural log-sum-exp of scaling * q.k over allowed keys
) -> dict[str, torch.Tensor]:
    """Every attention statistic of the contract (outputs as ``reference.attn_stats_ref``).

    With ``lse`` (from the forward attention, e.g. SDPA's logsumexp output) the kernel skips its first pass over
    the keys and takes the entropy and row max from the second; rows outside the key ranges are ignored.

    Tiles come from ``_settings.qk_stats_settings`` unless ``block_m``/``block_n`` pin them (tests do).
    ``poison=True`` fills the stored outputs (the query-axis vectors) with NaN first, so a test sees any element the
    kernel skipped.
    """
    check_interpreter()
    _check(q, k, ranges)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    B, H, L, D = q.shape
    R = spec.thumb_size
    st = qk_stats_settings(D, L, spec.bins, R, dtype=str(q.dtype).removeprefix("torch."))
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    vec = torch.zeros(len(stats.VECTORS), B, H, L, **f32)  # [V, B, H, L] by slot
    if poison:
        # a query-axis vector is stored whole by the programs of its rows; a key-axis one (final, recv_sum,
        # recv_max) is accumulated or written in part, so it starts at zero
        for s in stats.VECTORS:
            if s.axis == "query":
                vec[s.slot].fill_(float("nan"))
    hist_all = torch.zeros(B, H, spec.bins, device=dev, dtype=torch.int32)
    hist_log = torch.zeros_like(hist_all)
    mom = torch.zeros(B, H, 2, device=dev, dtype=torch.float64)
    dist = torch.zeros(B, H, stats.N_DIST_BUCKETS, device=dev, dtype=torch.float64)
    thumb = torch.zeros(B, H, R, R, **f32)

    _, cell, count = thumb_layout(ranges, L, R)  # [B, L] cell of each position, [B, R, R] pairs per cell
    cell = cell.to(torch.int32)
    tok = resolve_tokens(tokens, B, L, dev).contiguous()  # [B, L]
    tok_before = previous_tokens(tok, ranges).contiguous()  # [B, L]
    lse = validate_lse(lse, q)  # [B, H, L] float32 or None
    lse = lse.contiguous() if lse is not None else None
    start = ranges.start.to(dev, torch.int64)
    end = ranges.end.to(dev, torch.int64)

    args = (
        hist_all,
        hist_log,
        mom,
        dist,
        thumb,
        vec,
        vec.stride(0),
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        lse if lse is not None else vec,  # not read without lse
        start,
        end,
        cell.to(dev),
        tok,
        tok_before,
        L,
        H,
        H // k.shape[1],
        ranges.window or 0,
        R,
        scaling * _LOG2E,
        spec.log_min,
    )
    upcast = q.dtype == torch.bfloat16 and is_interpreter()
    meta = dict(
        HEAD_DIM=D,
        HEAD_DIM_PAD=st["HEAD_DIM_PAD"],
        NB=spec.bins,
        IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        HAS_LSE=lse is not None,
    )
    block_m, block_n = block_m or st["BLOCK_M"], block_n or st["BLOCK_N"]
    grid = (triton.cdiv(L, block_m), B * H)
    warps, stages = num_warps or st["num_warps"], st["num_stages"]
    _qk_stats_fused_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)

    n = _pairs(ranges)  # [B]
    r = min(R, L)  # no prompt has more thumbnail cells a side
    moments = torch.stack([n[:, None].expand(B, H).to(dev), mom[..., 0], mom[..., 1]], dim=-1)  # [B, H, 3]
    out = {
        stats.HIST_ALL.name: hist_all.long().sum(0).cpu(),
        stats.HIST_LOG.name: hist_log.long().sum(0).cpu(),
        stats.MOMENTS.name: moments.sum(0).cpu(),
        stats.DIST.name: dist.cpu(),
        stats.THUMB.name: (thumb[:, :, :r, :r].double().cpu() / count[:, None, :r, :r]).float(),
    }
    out.update({s.name: vec[s.slot] for s in stats.VECTORS})  # [B, H, L] each
    return out
