"""The tile-level pieces of the attention-statistics kernel (``qk_stats``): scores and logits of one key tile, the
key range of each row, the two passes' per-tile updates, and the writing of the per-row vectors.

Every function here is ``@triton.jit`` and inlined into ``qk_stats._qk_stats_fused_kernel``; the slots of the
[V, B, H, L] vector output and the distance-bucket count come from ``stats.py`` as constexpr globals.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import stats

__all__ = [
    "CAUSAL",
    "CHUNKED",
    "N_DIST",
    "SLIDING",
    "key_tiles",
    "logits",
    "pass1_rows",
    "pass1_tile",
    "pass2_tile",
    "row_lo",
    "scores",
    "store_rows",
]

# constants read inside @triton.jit code must be constexpr globals (a plain float compiles to a NameError)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG10_2 = tl.constexpr(0.30102999566398120)
N_DIST = tl.constexpr(stats.N_DIST_BUCKETS)
# the slots of the [V, B, H, L] vector output, from the declaration
_DIAG = tl.constexpr(stats.DIAG.slot)
_FINAL = tl.constexpr(stats.FINAL.slot)
_ENTROPY = tl.constexpr(stats.ENTROPY.slot)
_ROWMAX = tl.constexpr(stats.ROWMAX.slot)
_RECV_SUM = tl.constexpr(stats.RECV_SUM.slot)
_ARGMAX = tl.constexpr(stats.ARGMAX.slot)
_WINDOW_RECV = tl.constexpr(stats.WINDOW_RECV.slot)
_ASHAPE = tl.constexpr(stats.ASHAPE.slot)
_A_SINK_KEYS = tl.constexpr(stats.A_SINK_KEYS)
_A_LOCAL = tl.constexpr(stats.A_LOCAL)
_RECV_MAX = tl.constexpr(stats.RECV_MAX.slot)
_SINK = tl.constexpr(stats.SINK.slot)
_PREV = tl.constexpr(stats.PREV.slot)
_DUP = tl.constexpr(stats.DUP.slot)
_INDUCTION = tl.constexpr(stats.INDUCTION.slot)
_LEARNED_SINK = tl.constexpr(stats.LEARNED_SINK.slot)
# the layer's key range kind (KIND): causal, a sliding window of SPAN keys, or chunks of SPAN keys
CAUSAL, SLIDING, CHUNKED = 0, 1, 2
_SLIDING_K = tl.constexpr(SLIDING)
_CHUNKED_K = tl.constexpr(CHUNKED)


@triton.jit
def floor_log2(x):
    """floor(log2(x)) of positive integers below 2^24, exactly, from the float32 exponent."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return (bits >> 23) - 127


@triton.jit
def slot_row(VEC, SLOT: tl.constexpr, slot_stride, vec_row):
    """The (b, h) row of statistic ``SLOT`` in the [V, B, H, L] vector output."""
    return VEC + SLOT * slot_stride + vec_row


@triton.jit
def scores(
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
def logits(qk, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """t = s * log2 e, s = scaling * q . k, or softcap * tanh(scaling * q . k / softcap) when SOFTCAP (cap_in =
    scaling / softcap, cap_out = softcap * log2 e); tanh(x) = 1 - 2 / (e^(2x) + 1) saturates to +-1 without NaN."""
    if SOFTCAP:
        e2x = tl.exp2(qk * (cap_in * 2.8853900817779268))  # e^(2x), 2 log2 e
        return cap_out * (1.0 - 2.0 / (e2x + 1.0))
    return qk * qk_scale


@triton.jit
def row_lo(offs_m, start, SPAN, KIND: tl.constexpr):
    """[BM] first allowed key of each row: the padding start, the window's or the chunk's start."""
    lo = tl.zeros(offs_m.shape, dtype=tl.int32) + start
    if KIND == _SLIDING_K:
        lo = tl.maximum(lo, offs_m - SPAN + 1)
    if KIND == _CHUNKED_K:
        lo = tl.maximum(lo, start + (tl.maximum(offs_m - start, 0) // SPAN) * SPAN)
    return lo


@triton.jit
def pass1_tile(m_i, l_i, a_i, t, allowed, MASKED: tl.constexpr):
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
def pass2_tile(
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
    in_win,
    has_win,
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
    s1, s2, diag, prev, sink, dup, ind, dist, n_ok, n_hi, pt, pmax, best, arg, cov = acc
    lp2 = t - lse2[:, None]  # log2 p
    if MASKED:
        p = tl.where(allowed, tl.exp2(lp2), 0.0)
        key_ok = offs_n < L
    else:
        p = tl.exp2(lp2)
    # -- moments, and the entropy and row max when pass 1 was skipped --
    s1 += tl.sum(p, 1)
    s2 += tl.sum(p * p, 1)
    tile_max = tl.max(p, 1)  # [BM]
    if HAS_LSE:
        pt += tl.sum(p * lp2, 1)
        pmax = tl.maximum(pmax, tile_max)
    # -- argmax: the first key of the largest p (tiles come in no fixed order: a tie goes to the lower key) --
    tile_arg = tl.argmax(p, 1) + tl.min(offs_n, 0)  # [BM] absolute key
    take = (tile_max > best) | ((tile_max == best) & (tile_arg < arg))
    best = tl.where(take, tile_max, best)
    arg = tl.where(take, tile_arg, arg)
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
    recv_sum = slot_row(VEC, _RECV_SUM, slot_stride, vec_row) + offs_n
    recv_max = slot_row(VEC, _RECV_MAX, slot_stride, vec_row).to(tl.pointer_type(tl.int32)) + offs_n
    if MASKED:
        tl.atomic_add(recv_sum, tl.sum(p, 0), mask=key_ok, sem="relaxed")
        tl.atomic_max(recv_max, col_max.to(tl.int32, bitcast=True), mask=key_ok, sem="relaxed")
    else:
        tl.atomic_add(recv_sum, tl.sum(p, 0), sem="relaxed")
        tl.atomic_max(recv_max, col_max.to(tl.int32, bitcast=True), sem="relaxed")
    # -- the observation window (the prompt's last rows): only the few tiles that hold such a row add --
    if has_win:
        win = slot_row(VEC, _WINDOW_RECV, slot_stride, vec_row) + offs_n
        win_sum = tl.sum(tl.where(in_win[:, None], p, 0.0), 0)  # [BN]
        if MASKED:
            tl.atomic_add(win, win_sum, mask=key_ok, sem="relaxed")
        else:
            tl.atomic_add(win, win_sum, sem="relaxed")
    # -- head-role masses: earlier keys holding the query's token, or following it --
    if MASKED:
        tk = tl.load(TOK + tok_row + offs_n, mask=key_ok, other=-3)  # [BN]
        tkb = tl.load(TOKB + tok_row + offs_n, mask=key_ok, other=-3)  # [BN]
    else:
        tk = tl.load(TOK + tok_row + offs_n)
        tkb = tl.load(TOKB + tok_row + offs_n)
    dj = offs_m[:, None] - offs_n[None, :]  # [BM, BN] distance i - j
    # -- A-shape coverage: the first keys and the local window (a tile wholly outside both adds nothing) --
    n_first = tl.min(offs_n, 0)
    no_gap = m_lo + BLOCK_M - _A_LOCAL <= start + _A_SINK_KEYS  # every row keeps all its keys: cov = the row sum
    if (~no_gap) & ((n_first < start + _A_SINK_KEYS) | (m_lo - (n_first + BLOCK_N - 1) < _A_LOCAL)):
        cov += tl.sum(tl.where((offs_n[None, :] < start + _A_SINK_KEYS) | (dj < _A_LOCAL), p, 0.0), 1)
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
        final = slot_row(VEC, _FINAL, slot_stride, vec_row) + offs_n
        tl.store(final, fin, mask=key_ok & (tl.zeros([BLOCK_N], tl.int32) + n_final > 0))
        k_lo = floor_log2(tl.min(tl.min(tl.where(allowed, dj, 1 << 24), 1), 0) + 1)
        k_hi = floor_log2(tl.max(tl.max(tl.where(allowed, dj, -1), 1), 0) + 1)  # -127 with no allowed pair
    else:
        dup += tl.sum(tl.where(tq[:, None] == tk[None, :], p, 0.0), 1)
        ind += tl.sum(tl.where(tq[:, None] == tkb[None, :], p, 0.0), 1)
        n0 = tl.min(offs_n, 0)
        k_lo = floor_log2(m_lo - (n0 + BLOCK_N - 1) + 1)
        k_hi = floor_log2(m_lo + BLOCK_M - 1 - n0 + 1)
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
    return s1, s2, diag, prev, sink, dup, ind, dist, n_ok, n_hi, pt, pmax, best, arg, cov


@triton.jit
def key_tiles(m_lo, start, end, SPAN, KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles of the query tile [m_lo, m_lo + BLOCK_M): [k_begin, u_lo) and [u_hi, k_end) on-band (masked),
    [u_lo, u_hi) off-band (no mask), and the number of masked tiles before the off-band ones and in all."""
    m_hi = m_lo + BLOCK_M
    k_end = tl.minimum(m_hi, end)
    k_begin = start
    if KIND == _SLIDING_K:
        k_begin = tl.maximum(start, m_lo - SPAN + 1)
    if KIND == _CHUNKED_K:  # the chunk of the tile's first row
        k_begin = start + (tl.maximum(m_lo - start, 0) // SPAN) * SPAN
    k_begin = (k_begin // BLOCK_N) * BLOCK_N
    # off-band: every row real, no final row, keys past the sink column and at least 2 before the first row, and
    # past the window's or chunk's start of the tile's last row
    u_lo = (start // BLOCK_N + 1) * BLOCK_N
    if KIND == _SLIDING_K:
        u_lo = tl.maximum(u_lo, tl.cdiv(tl.maximum(m_hi - SPAN, 0), BLOCK_N) * BLOCK_N)
    if KIND == _CHUNKED_K:
        last_lo = start + (tl.maximum(m_hi - 1 - start, 0) // SPAN) * SPAN
        u_lo = tl.maximum(u_lo, tl.cdiv(last_lo, BLOCK_N) * BLOCK_N)
    u_lo = tl.maximum(u_lo, k_begin)
    u_hi = (tl.maximum(m_lo - 1, 0) // BLOCK_N) * BLOCK_N
    if (m_lo < start) | (m_hi >= end) | (u_hi <= u_lo):  # no off-band tile: one masked range
        u_lo = k_end
        u_hi = k_end
    # the masked tiles [k_begin, u_lo) and [u_hi, k_end) run in one loop (one copy of the masked code)
    n_first = tl.cdiv(u_lo - k_begin, BLOCK_N)
    n_masked = n_first + tl.cdiv(k_end - u_hi, BLOCK_N)
    return k_begin, u_lo, u_hi, k_end, n_first, n_masked


@triton.jit
def pass1_rows(m_i, l_i, a_i, row_ok, sink2, HAS_SINKS: tl.constexpr):
    """lse2, entropy and max p of each row from pass 1's running max m, l = sum 2^(t - m), a = sum 2^(t - m) (t - m)
    (and the sink's logit ``sink2``, log2 units, when HAS_SINKS)."""
    valid = row_ok & (l_i > 0)
    l_safe = tl.where(valid, l_i, 1.0)
    if HAS_SINKS:
        # the sink is one more term of the denominator: rebase m, l and a on max(m, sink), then
        # lse2 = m + log2(l + 2^(sink - m)), H = ln 2 (l_keys log2 l - a) / l, max p = 2^(m_keys - m) / l
        m_safe = tl.where(valid, m_i, 0.0)
        m_f = tl.maximum(m_safe, sink2)
        alpha = tl.exp2(m_safe - m_f)
        l_keys = alpha * l_safe
        a_f = alpha * (a_i + (m_safe - m_f) * l_safe)
        l_f = l_keys + tl.exp2(sink2 - m_f)
        lse2 = tl.where(valid, m_f + tl.log2(l_f), 0.0)
        ent = tl.where(valid, _LN2 * (l_keys * tl.log2(l_f) - a_f) / l_f, 0.0)
        rowmax = tl.where(valid, alpha / l_f, 0.0)
    else:
        lse2 = tl.where(valid, m_i + tl.log2(l_safe), 0.0)
        ent = tl.where(valid, _LN2 * (tl.log2(l_safe) - a_i / l_safe), 0.0)
        rowmax = tl.where(valid, 1.0 / l_safe, 0.0)
    return lse2, ent, rowmax


@triton.jit
def store_rows(
    VEC, slot_stride, vec_row, offs_m, row_ok, L, lse2, sink2, ent, rowmax, s1, pt, pmax, diag, prev, sink, dup, ind,
    arg, start, cov, HAS_LSE: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """Write every query-axis vector of the tile's rows (each element: the output is never pre-filled)."""
    zm = tl.zeros(offs_m.shape, tl.float32)
    if HAS_SINKS:
        share = tl.where(row_ok, tl.exp2(sink2 - lse2), 0.0)
    else:
        share = zm
    if HAS_LSE:
        # the row statistics of p / z, z = sum p + the sink's share (~1): exact whatever the rounding of the given
        # lse, as on the CPU; H = (-ln 2 sum p log2 p + ln z sum p) / z
        z = tl.where(row_ok & (s1 + share > 0), s1 + share, 1.0)
        inv = 1.0 / z
        ent = tl.where(row_ok, (-_LN2 * pt + tl.log(z) * s1) * inv, 0.0)
        rowmax = tl.where(row_ok, pmax * inv, 0.0)
        diag = diag * inv
        prev = prev * inv
        sink = sink * inv
        dup = dup * inv
        ind = ind * inv
        cov = cov * inv
        share = share * inv

    rmask = offs_m < L
    tl.store(slot_row(VEC, _DIAG, slot_stride, vec_row) + offs_m, diag, mask=rmask)
    tl.store(slot_row(VEC, _PREV, slot_stride, vec_row) + offs_m, prev, mask=rmask)
    tl.store(slot_row(VEC, _DUP, slot_stride, vec_row) + offs_m, dup, mask=rmask)
    tl.store(slot_row(VEC, _INDUCTION, slot_stride, vec_row) + offs_m, ind, mask=rmask)
    tl.store(slot_row(VEC, _ASHAPE, slot_stride, vec_row) + offs_m, cov, mask=rmask)
    tl.store(slot_row(VEC, _SINK, slot_stride, vec_row) + offs_m, sink, mask=rmask)
    tl.store(slot_row(VEC, _ENTROPY, slot_stride, vec_row) + offs_m, ent, mask=rmask)
    tl.store(slot_row(VEC, _ROWMAX, slot_stride, vec_row) + offs_m, rowmax, mask=rmask)
    tl.store(slot_row(VEC, _LEARNED_SINK, slot_stride, vec_row) + offs_m, share, mask=rmask)
    tl.store(slot_row(VEC, _ARGMAX, slot_stride, vec_row) + offs_m, tl.where(row_ok, arg - start, 0).to(tl.float32),
             mask=rmask)  # fmt: skip
