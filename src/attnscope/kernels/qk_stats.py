"""Attention statistics in Triton: QK^T recomputed tile by tile and reduced on the spot, P never written.

One program per (query tile, batch row, head). Pass 1 streams the key tiles and keeps, per row, the running
max m (log2 units), l = sum 2^(t - m) and a = sum 2^(t - m) (t - m), so that

    lse2 = m + log2 l,   max p = 1 / l,   H = ln 2 * (log2 l - a / l)     (t = s * log2 e)

When the caller has the log-sum-exp from the forward attention (``lse``), pass 1 is skipped: lse2 = lse * log2 e,
and pass 2 also sums -sum_j p log2 p = -sum_j p (t - lse2) (written around lse, no cancellation) and max p; the row
statistics are then those of p / z, z = sum_j p (+ the sink's share), which is 1 up to the rounding of the given lse.

The attention each model defines: logits t = softcap * tanh(s / softcap) * log2 e when it caps them (``SOFTCAP``);
a learned sink logit per head is one more term of the denominator (``HAS_SINKS``: pass 1 rebases its running sums on
it, and its share 2^(sink - lse2) is the ``learned_sink`` vector); the key range of row i is [lo_i, i] with lo_i
from the padding start and, by the constexpr ``KIND``, a sliding window or a chunk of ``SPAN`` keys.

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

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import stats
from ._settings import check_interpreter, is_interpreter, qk_stats_settings
from .contract import (
    PLAIN,
    AttnStatsSpec,
    KeyRanges,
    ScoreMod,
    Spans,
    pool_layout,
    pooled_thumbnail,
    previous_tokens,
    resolve_tokens,
    span_attention,
    validate_lse,
    validate_qk,
)
from .qk_tiles import (
    CAUSAL,
    CHUNKED,
    N_DIST,
    SLIDING,
    key_tiles,
    logits,
    pass1_rows,
    pass1_tile,
    pass2_tile,
    row_lo,
    scores,
    store_rows,
)

__all__ = ["qk_stats"]

_LOG2E = 1.4426950408889634  # used by the launcher only
OBS_WINDOW = tl.constexpr(stats.OBS_WINDOW)
_A_SINK_KEYS = tl.constexpr(stats.A_SINK_KEYS)
_A_LOCAL = tl.constexpr(stats.A_LOCAL)


@triton.jit
def _qk_stats_fused_kernel(
    HIST_ALL,
    HIST_LOG,  # [B, H, NB] int32 (atomic add)
    MOM,  # [B, H, 2] float64: sum p, sum p^2 (atomic add)
    DIST,  # [B, H, N_DIST_BUCKETS] float64 (atomic add)
    THUMB,  # [B, H, R, R] float32 sums of p per pooled cell (atomic add; R: ``contract.PoolLayout.P``)
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
    CELL,  # [B, L] int32 pooled cell of each position (-1: padding)
    TOK,  # [B, L] int64 token ids
    TOKB,  # [B, L] int64 token j - 1 at key j (-1 where j - 1 is not a real token)
    SINKS,  # [H] float32 learned sink logits (read when HAS_SINKS)
    L,
    H,
    GROUP,
    SPAN,  # the window or chunk size (KIND)
    R,
    qk_scale,  # scaling * log2 e
    cap_in,  # scaling / softcap (SOFTCAP)
    cap_out,  # softcap * log2 e (SOFTCAP)
    log_min,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_LSE: tl.constexpr,
    KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
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
    lo_row = row_lo(offs_m, start, SPAN, KIND)
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
    k_begin, u_lo, u_hi, k_end, n_first, n_masked = key_tiles(m_lo, start, end, SPAN, KIND, BLOCK_M, BLOCK_N)

    sink2 = 0.0
    if HAS_SINKS:
        sink2 = tl.load(SINKS + h) * 1.4426950408889634  # log2 units
    if HAS_LSE:
        lse_in = tl.load(LSE + vec_row + offs_m, mask=row_ok, other=0.0)
        lse2 = tl.where(row_ok, lse_in * 1.4426950408889634, 0.0)
        ent = tl.zeros([BLOCK_M], tl.float32)  # entropy and max p come from pass 2 (store_rows)
        rowmax = ent
    else:
        # -- pass 1: running max, sum and sum(e * (t - m)) per row --
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        a_i = tl.zeros([BLOCK_M], tl.float32)
        for it in range(0, n_masked):
            n0 = k_begin + it * BLOCK_N + (it >= n_first).to(tl.int32) * (u_hi - u_lo)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            qk = scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, True)
            allowed = row_ok[:, None] & (offs_n[None, :] >= lo_row[:, None]) & (offs_n[None, :] <= offs_m[:, None])
            m_i, l_i, a_i = pass1_tile(m_i, l_i, a_i, logits(qk, qk_scale, cap_in, cap_out, SOFTCAP), allowed, True)
        for n0 in range(u_lo, u_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            qk = scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, False)
            t = logits(qk, qk_scale, cap_in, cap_out, SOFTCAP)
            m_i, l_i, a_i = pass1_tile(m_i, l_i, a_i, t, row_ok[:, None], False)
        lse2, ent, rowmax = pass1_rows(m_i, l_i, a_i, row_ok, sink2, HAS_SINKS)

    # -- pass 2: p tile by tile, reduced into every statistic --
    zm = tl.zeros([BLOCK_M], tl.float32)
    acc = (zm, zm, zm, zm, zm, zm, zm, tl.zeros([N_DIST], tl.float32), 0, 0, zm, zm, zm - 1.0, offs_m * 0, zm)
    tq = tl.load(TOK + tok_row + offs_m, mask=offs_m < L, other=-2)  # [BM] query tokens
    rc = tl.load(CELL + tok_row + offs_m, mask=offs_m < L, other=-1)  # [BM] thumbnail row cells
    thumb_row = bh * R * R
    bucket_ids = tl.arange(0, N_DIST)
    is_final = offs_m == end - 1
    in_win = row_ok & (offs_m >= end - OBS_WINDOW)  # [BM] rows of the observation window
    has_win = (m_lo + BLOCK_M > end - OBS_WINDOW) & (m_lo < end)
    for it in range(0, n_masked):
        n0 = k_begin + it * BLOCK_N + (it >= n_first).to(tl.int32) * (u_hi - u_lo)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        qk = scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, True)
        allowed = row_ok[:, None] & (offs_n[None, :] >= lo_row[:, None]) & (offs_n[None, :] <= offs_m[:, None])
        acc = pass2_tile(
            acc, logits(qk, qk_scale, cap_in, cap_out, SOFTCAP), allowed, offs_m, offs_n, lse2, tq, rc,
            bucket_ids, start, m_lo, is_final, in_win, has_win,
            HIST_ALL, HIST_LOG, VEC, slot_stride, THUMB, CELL, TOK, TOKB, tok_row, vec_row, hist_row,
            thumb_row, R, L, NB, log_min, BLOCK_M, BLOCK_N, HAS_LSE, True,
        )  # fmt: skip
    for n0 in range(u_lo, u_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        qk = scores(q, k_base, stride_kn, offs_n, offs_d, L, HEAD_DIM, HEAD_DIM_PAD, IEEE, UPCAST, False)
        acc = pass2_tile(
            acc, logits(qk, qk_scale, cap_in, cap_out, SOFTCAP), row_ok[:, None], offs_m, offs_n, lse2, tq, rc,
            bucket_ids, start, m_lo, is_final, in_win, has_win,
            HIST_ALL, HIST_LOG, VEC, slot_stride, THUMB, CELL, TOK, TOKB, tok_row, vec_row, hist_row,
            thumb_row, R, L, NB, log_min, BLOCK_M, BLOCK_N, HAS_LSE, False,
        )  # fmt: skip
    s1, s2, diag, prev, sink, dup, ind, dist, n_ok, n_hi, pt, pmax, best, arg, cov = acc
    if m_lo + BLOCK_M - _A_LOCAL <= start + _A_SINK_KEYS:  # no row of the tile has a key outside the A-shape
        cov = s1
    store_rows(
        VEC, slot_stride, vec_row, offs_m, row_ok, L, lse2, sink2, ent, rowmax, s1, pt, pmax,
        diag, prev, sink, dup, ind, arg, start, cov, HAS_LSE, HAS_SINKS,
    )  # fmt: skip
    tl.atomic_add(HIST_ALL + hist_row, n_ok - n_hi, sem="relaxed")  # linear bin 0: every pair not added above
    tl.atomic_add(MOM + bh * 2, tl.sum(s1, 0).to(tl.float64), sem="relaxed")
    tl.atomic_add(MOM + bh * 2 + 1, tl.sum(s2, 0).to(tl.float64), sem="relaxed")
    tl.atomic_add(DIST + bh * N_DIST + bucket_ids, dist.to(tl.float64), sem="relaxed")


def _check(q: torch.Tensor, k: torch.Tensor, ranges: KeyRanges) -> None:
    if not (q.is_cuda or is_interpreter()):
        raise ValueError("qk_stats runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
    validate_qk(q, k, ranges)


def _pairs(ranges: KeyRanges) -> torch.Tensor:
    """Allowed (query, key) pairs per batch row, in closed form: sum over queries of their key counts."""
    n = (ranges.end - ranges.start).clamp_min(0).double()  # [B]
    if ranges.chunk is not None:  # full chunks of c tokens, then the rest
        c = float(ranges.chunk)
        full, rest = torch.div(n, c, rounding_mode="floor"), torch.remainder(n, c)
        return full * c * (c + 1) / 2 + rest * (rest + 1) / 2
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
    mod: ScoreMod = PLAIN,  # the model's logit softcapping and learned sinks
    spans: Sequence[Spans | None] | None = None,  # per batch row its named spans (``contract.validate_spans``)
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
    layout = pool_layout(ranges, L, R, spans)  # the thumbnail's cells, cut at the spans' boundaries
    thumb = torch.zeros(B, H, layout.P, layout.P, **f32)  # sums of p per pooled cell
    cell = layout.cell.to(torch.int32)  # [B, L] pooled cell of each position
    tok = resolve_tokens(tokens, B, L, dev).contiguous()  # [B, L]
    tok_before = previous_tokens(tok, ranges).contiguous()  # [B, L]
    lse = validate_lse(lse, q)  # [B, H, L] float32 or None
    lse = lse.contiguous() if lse is not None else None
    start = ranges.start.to(dev, torch.int64)
    end = ranges.end.to(dev, torch.int64)
    sinks = mod.sink_logits(H, dev)  # [H] float32 or None
    sinks = sinks.contiguous() if sinks is not None else None

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
        sinks if sinks is not None else vec,  # not read without sinks
        L,
        H,
        H // k.shape[1],
        ranges.span or 0,
        layout.P,
        scaling * _LOG2E,
        scaling / (mod.softcap or 1.0),
        (mod.softcap or 1.0) * _LOG2E,
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
        KIND=CHUNKED if ranges.chunk is not None else SLIDING if ranges.window is not None else CAUSAL,
        SOFTCAP=mod.softcap is not None,
        HAS_SINKS=sinks is not None,
    )
    block_m, block_n = block_m or st["BLOCK_M"], block_n or st["BLOCK_N"]
    grid = (triton.cdiv(L, block_m), B * H)
    warps, stages = num_warps or st["num_warps"], st["num_stages"]
    _qk_stats_fused_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)

    n = _pairs(ranges)  # [B]
    moments = torch.stack([n[:, None].expand(B, H).to(dev), mom[..., 0], mom[..., 1]], dim=-1)  # [B, H, 3]
    out = {
        stats.HIST_ALL.name: hist_all.long().sum(0).cpu(),
        stats.HIST_LOG.name: hist_log.long().sum(0).cpu(),
        stats.MOMENTS.name: moments.sum(0).cpu(),
        stats.DIST.name: dist.cpu(),
    }
    out.update({s.name: vec[s.slot] for s in stats.VECTORS})  # [B, H, L] each
    out[stats.THUMB.name] = pooled_thumbnail(thumb, layout)
    if layout.spans is not None:
        out[stats.SPAN.name] = span_attention(thumb, out[stats.ARGMAX.name], ranges, layout)
    return out
