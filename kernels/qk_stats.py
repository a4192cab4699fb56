"""Attention statistics in Triton: QK^T recomputed tile by tile and reduced on the spot, P never written.

One program per (query tile, batch row, head). Pass 1 streams the key tiles and keeps, per row, the running
max m (log2 units), l = sum 2^(t - m) and a = sum 2^(t - m) (t - m), so that

    lse2 = m + log2 l,   max p = 1 / l,   H = ln 2 * (log2 l - a / l)     (t = s * log2 e)

Pass 2 streams the key tiles again, forms p = 2^(t - lse2) and reduces each tile into every statistic of
``contract.py``: the linear and log10 histograms (``tl.histogram`` of every pair of the tile, masked pairs
sent to bin 0 and taken out of it once; kept for the whole query tile and added once), the moments, the
diagonal, previous-token, sink and final-row values, attention received (atomic sum and max per key),
distance buckets, and the thumbnail (a ``tl.dot`` of p with a one-hot of key cells, pooled over rows with
one atomic add per row and cell at the end).
GQA reads key head h // group; keys are never repeated. References: Triton tutorial 06-fused-attention
(online softmax in exp2, LSE recompute in the backward), ``reference.attn_stats_ref`` for the maths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._settings import is_interpreter, qk_stats_settings
from .contract import (
    ATTN_VECTOR_STATS,
    N_DIST_BUCKETS,
    AttnStatsSpec,
    KeyRanges,
    previous_tokens,
    resolve_tokens,
    thumb_layout,
    validate_qk,
)

__all__ = ["qk_stats"]

# float32 per-position outputs of the kernel (pointer arguments)
OUT_F32 = ("THUMB", "DIAG", "ENT", "ROWMAX", "SINK", "PREV", "DUP", "IND", "FINAL", "RECV_SUM", "RECV_MAX")

_LOG2E = 1.4426950408889634  # used by the launcher only
# constants read inside @triton.jit code must be constexpr globals (a plain float compiles to a NameError)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG10_2 = tl.constexpr(0.30102999566398120)


@triton.jit
def _floor_log2(x):
    """floor(log2(x)) of positive integers below 2^24, exactly, from the float32 exponent."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return (bits >> 23) - 127


@triton.jit
def _score_tile(
    q,
    k_base,
    stride_kn,
    n0,
    offs_m,
    offs_d,
    row_ok,
    lo_row,
    L,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key tile: its positions, q . k for every (row, key) pair, and which pairs are allowed."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = tl.load(
        k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=(offs_n < L)[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    allowed = row_ok[:, None] & (offs_n[None, :] >= lo_row[:, None]) & (offs_n[None, :] <= offs_m[:, None])
    return offs_n, qk, allowed


@triton.jit
def _qk_stats_fused_kernel(
    HIST_ALL,
    HIST_LOG,  # [B, H, NB] int32 (atomic add)
    MOM,  # [B, H, 2] float64: sum p, sum p^2 (atomic add)
    DIST,  # [B, H, 32] float64 (atomic add)
    THUMB,  # [B, H, R, R] float32 sums of p per cell (atomic add)
    DIAG,
    ENT,
    ROWMAX,
    SINK,
    PREV,
    DUP,
    IND,  # [B, H, L] float32, every element stored
    FINAL,
    RECV_SUM,
    RECV_MAX,  # [B, H, L] float32, zero-initialised
    Q,
    stride_qb,
    stride_qh,
    stride_qm,  # [B, H, L, D]
    K,
    stride_kb,
    stride_kh,
    stride_kn,  # [B, H_kv, L, D]
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
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Every attention statistic of one (query tile, batch row, head); see the module docstring."""
    tl.static_assert(BLOCK_N >= 16 and BLOCK_M >= 16)
    tl.static_assert(R_PAD >= 16)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    start = tl.load(START + b)
    end = tl.load(END + b)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] absolute query positions
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = (offs_m >= start) & (offs_m < end)
    lo_row = tl.zeros([BLOCK_M], dtype=tl.int64) + start
    if WINDOW > 0:
        lo_row = tl.maximum(lo_row, offs_m - WINDOW + 1)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=(offs_m < L)[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter's tl.dot mishandles bfloat16; the compiled kernel keeps the bf16 dot
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh

    # key tiles that can hold an allowed key of this query tile
    m_lo = pid_m * BLOCK_M
    k_end = tl.minimum(m_lo + BLOCK_M, end)
    k_begin = start
    if WINDOW > 0:
        k_begin = tl.maximum(start, m_lo - WINDOW + 1)
    k_begin = (k_begin // BLOCK_N) * BLOCK_N

    # -- pass 1: running max, sum and sum(e * (t - m)) per row --
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(k_begin, k_end, BLOCK_N):
        offs_n, qk, allowed = _score_tile(
            q, k_base, stride_kn, n0, offs_m, offs_d, row_ok, lo_row, L, HEAD_DIM, BLOCK_N, IEEE, UPCAST
        )
        t = tl.where(allowed, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        m_old = tl.where(m_i == float("-inf"), m_safe, m_i)
        alpha = tl.exp2(m_old - m_safe)
        e = tl.exp2(t - m_safe[:, None])  # masked -> 0
        d = tl.where(allowed, t - m_safe[:, None], 0.0)
        # -- update m_i, l_i, a_i --
        a_i = alpha * (a_i + (m_old - m_safe) * l_i) + tl.sum(e * d, 1)
        l_i = alpha * l_i + tl.sum(e, 1)
        m_i = m_new
    valid = row_ok & (l_i > 0)
    l_safe = tl.where(valid, l_i, 1.0)
    lse2 = tl.where(valid, m_i + tl.log2(l_safe), 0.0)
    ent = tl.where(valid, _LN2 * (tl.log2(l_safe) - a_i / l_safe), 0.0)
    rowmax = tl.where(valid, 1.0 / l_safe, 0.0)

    # -- pass 2: p tile by tile, reduced into every statistic --
    hist_all = tl.zeros([NB], tl.int32)
    hist_log = tl.zeros([NB], tl.int32)
    n_masked = 0  # pairs of the visited tiles outside the mask, all counted in bin 0
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    diag = tl.zeros([BLOCK_M], tl.float32)
    prev = tl.zeros([BLOCK_M], tl.float32)
    sink = tl.zeros([BLOCK_M], tl.float32)
    dup = tl.zeros([BLOCK_M], tl.float32)
    ind = tl.zeros([BLOCK_M], tl.float32)
    tq = tl.load(TOK + b * L + offs_m, mask=offs_m < L, other=-2)  # [BM] query tokens
    dist = tl.zeros([32], tl.float32)
    bucket_ids = tl.arange(0, 32)
    cells = tl.arange(0, R_PAD)
    pool = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    is_final = offs_m == end - 1
    bh = b * H + h
    log_scale = NB / -log_min
    for n0 in range(k_begin, k_end, BLOCK_N):
        offs_n, qk, allowed = _score_tile(
            q, k_base, stride_kn, n0, offs_m, offs_d, row_ok, lo_row, L, HEAD_DIM, BLOCK_N, IEEE, UPCAST
        )
        lp2 = qk * qk_scale - lse2[:, None]  # log2 p
        p = tl.where(allowed, tl.exp2(lp2), 0.0)
        # -- histograms and moments --
        # masked pairs go to bin 0 (p = 0 there already) and are taken out of it once at the end: a mask
        # reshaped apart from the values could pair with other elements in the compiled layouts
        lin = tl.minimum((p * NB).to(tl.int32), NB - 1)
        hist_all += tl.histogram(tl.reshape(lin, [BLOCK_M * BLOCK_N]), NB)
        x = (lp2 * _LOG10_2 - log_min) * log_scale
        lg = tl.where(allowed, tl.minimum(tl.maximum(x, 0.0).to(tl.int32), NB - 1), 0)
        hist_log += tl.histogram(tl.reshape(lg, [BLOCK_M * BLOCK_N]), NB)
        n_masked += BLOCK_M * BLOCK_N - tl.sum(tl.sum(allowed.to(tl.int32), 1), 0)
        s1 += tl.sum(p, 1)
        s2 += tl.sum(p * p, 1)
        # -- values on fixed diagonals and columns --
        dj = offs_m[:, None] - offs_n[None, :]  # [BM, BN] distance i - j
        diag += tl.sum(tl.where(dj == 0, p, 0.0), 1)
        prev += tl.sum(tl.where(dj == 1, p, 0.0), 1)
        sink += tl.sum(tl.where(offs_n[None, :] == start, p, 0.0), 1)
        # -- head-role masses: earlier keys holding the query's token, or following it --
        tk = tl.load(TOK + b * L + offs_n, mask=offs_n < L, other=-3)  # [BN]
        tkb = tl.load(TOKB + b * L + offs_n, mask=offs_n < L, other=-3)  # [BN]
        earlier = dj > 0
        dup += tl.sum(tl.where(earlier & (tq[:, None] == tk[None, :]), p, 0.0), 1)
        ind += tl.sum(tl.where(earlier & (tq[:, None] == tkb[None, :]), p, 0.0), 1)
        fin = tl.sum(tl.where(is_final[:, None], p, 0.0), 0)  # [BN] the final row, if in this tile
        n_final = tl.sum(is_final.to(tl.int32), 0)  # 1 when the final row is in this tile
        tl.store(FINAL + bh * L + offs_n, fin, mask=(offs_n < L) & (tl.zeros([BLOCK_N], tl.int32) + n_final > 0))
        # -- attention received --
        tl.atomic_add(RECV_SUM + bh * L + offs_n, tl.sum(p, 0), mask=offs_n < L)
        tl.atomic_max(RECV_MAX + bh * L + offs_n, tl.max(p, 0), mask=offs_n < L)
        # -- distance buckets floor(log2(i - j + 1)): a tile spans few of them --
        bk = _floor_log2(tl.maximum(dj, 0) + 1)
        k_lo = tl.min(tl.where(allowed, bk, 64))
        k_hi = tl.max(tl.where(allowed, bk, -1))
        for kb in range(k_lo, k_hi + 1):
            mass = tl.sum(tl.sum(tl.where(bk == kb, p, 0.0), 1), 0)
            dist = tl.where(bucket_ids == kb, dist + mass, dist)
        # -- thumbnail: pool p over the key cells with a one-hot matmul --
        cc = tl.load(CELL + b * L + offs_n, mask=offs_n < L, other=-1)
        onehot = (cc[:, None] == cells[None, :]).to(tl.float32)  # [BN, R_PAD]
        pool += tl.dot(p, onehot, input_precision="ieee")

    # -- write the per-row vectors (every element of the tile), then the accumulators --
    rmask = offs_m < L
    tl.store(DIAG + bh * L + offs_m, diag, mask=rmask)
    tl.store(PREV + bh * L + offs_m, prev, mask=rmask)
    tl.store(DUP + bh * L + offs_m, dup, mask=rmask)
    tl.store(IND + bh * L + offs_m, ind, mask=rmask)
    tl.store(SINK + bh * L + offs_m, sink, mask=rmask)
    tl.store(ENT + bh * L + offs_m, ent, mask=rmask)
    tl.store(ROWMAX + bh * L + offs_m, rowmax, mask=rmask)
    bins = tl.arange(0, NB)
    hist_all -= tl.where(bins == 0, n_masked, 0)
    hist_log -= tl.where(bins == 0, n_masked, 0)
    tl.atomic_add(HIST_ALL + bh * NB + bins, hist_all)
    tl.atomic_add(HIST_LOG + bh * NB + bins, hist_log)
    tl.atomic_add(MOM + bh * 2, tl.sum(s1, 0).to(tl.float64))
    tl.atomic_add(MOM + bh * 2 + 1, tl.sum(s2, 0).to(tl.float64))
    tl.atomic_add(DIST + bh * 32 + bucket_ids, dist.to(tl.float64))
    rc = tl.load(CELL + b * L + offs_m, mask=rmask, other=-1)
    tl.atomic_add(
        THUMB + bh * R * R + rc[:, None] * R + cells[None, :], pool, mask=(rc >= 0)[:, None] & (cells < R)[None, :]
    )


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
) -> dict[str, torch.Tensor]:
    """Every attention statistic of the contract (outputs as ``reference.attn_stats_ref``).

    Tiles come from ``_settings.qk_stats_settings`` unless ``block_m``/``block_n`` pin them (tests do).
    ``poison=True`` fills the stored outputs with NaN first, so a test sees any element the kernel skipped.
    """
    _check(q, k, ranges)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    B, H, L, D = q.shape
    R = spec.thumb_size
    st = qk_stats_settings(D, L, spec.bins, R, dtype=str(q.dtype).removeprefix("torch."))
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    fill = float("nan") if poison else 0.0
    stored = {
        v: torch.full((B, H, L), fill, **f32) for v in ("diag", "entropy", "rowmax", "sink", "prev", "dup", "induction")
    }
    final = torch.zeros(B, H, L, **f32)
    recv_sum = torch.zeros(B, H, L, **f32)
    recv_max = torch.zeros(B, H, L, **f32)
    hist_all = torch.zeros(B, H, spec.bins, device=dev, dtype=torch.int32)
    hist_log = torch.zeros_like(hist_all)
    mom = torch.zeros(B, H, 2, device=dev, dtype=torch.float64)
    dist = torch.zeros(B, H, N_DIST_BUCKETS, device=dev, dtype=torch.float64)
    thumb = torch.zeros(B, H, R, R, **f32)

    _, cell, count = thumb_layout(ranges, L, R)  # [B, L] cell of each position, [B, R, R] pairs per cell
    cell = cell.to(torch.int32)
    tok = resolve_tokens(tokens, B, L, dev).contiguous()  # [B, L]
    tok_before = previous_tokens(tok, ranges).contiguous()  # [B, L]
    start = ranges.start.to(dev, torch.int64)
    end = ranges.end.to(dev, torch.int64)

    args = (
        hist_all,
        hist_log,
        mom,
        dist,
        thumb,
        stored["diag"],
        stored["entropy"],
        stored["rowmax"],
        stored["sink"],
        stored["prev"],
        stored["dup"],
        stored["induction"],
        final,
        recv_sum,
        recv_max,
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k,
        k.stride(0),
        k.stride(1),
        k.stride(2),
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
        R_PAD=st["R_PAD"],
        IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast,
    )
    if is_interpreter():  # small tiles keep the interpreter fast; the tests pin their own
        st.update(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    block_m, block_n = block_m or st["BLOCK_M"], block_n or st["BLOCK_N"]
    grid = (triton.cdiv(L, block_m), B * H)
    warps, stages = num_warps or st["num_warps"], st["num_stages"]
    _qk_stats_fused_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)

    n = _pairs(ranges)  # [B]
    moments = torch.stack([n[:, None].expand(B, H).to(dev), mom[..., 0], mom[..., 1]], dim=-1)  # [B, H, 3]
    out = {
        "hist_all": hist_all.long().sum(0).cpu(),
        "hist_log": hist_log.long().sum(0).cpu(),
        "moments": moments.sum(0).cpu(),
        "dist": dist.sum(0).cpu(),
        "thumb": (thumb.double().cpu() / count[:, None]).float(),
        "final": final,
        "recv_sum": recv_sum,
        "recv_max": recv_max,
        **stored,
    }
    assert set(ATTN_VECTOR_STATS) <= set(out)
    return out
