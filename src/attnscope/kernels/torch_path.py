"""Attention statistics in torch, one query block at a time: the CPU path, same contract as the Triton kernels.

Memory per call is O(B x H x block_q x L) for one block of scores, never O(L^2). On the CPU with Numba, each
block is one matmul (scores) and one fused Numba pass that reduces them to every statistic (``_cpu_fused``).
Without Numba (or on another device) the block goes through torch operations:

    s   = scaling * q_blk @ k[kstart:i1]^T            (GQA by viewing q as [B, H_kv, group, ...])
    s   = softcap * tanh(s / softcap)                  (a model that caps its logits)
    d   = s - m,  z = sum exp(d) (+ exp(sink - m)),  p = exp(d) / z   (masked entries: a large finite negative)
    H   = log z sum p - sum p d,  log p = d - log z,  learned sink's share = exp(sink - m) / z
    (given the forward's lse, it stands in for m; the Numba pass then skips its max and sum passes)

and every statistic is a reduction of p: row sums and maxima, column sums and maxima, gathers on the
diagonal, and one cumulative sum along the keys that yields both the distance buckets and the pooled
thumbnail as differences at cell edges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._cpu_fused import HAS_NUMBA, FusedState, fused_block, previous_occurrence
from ._cpu_gemm import linear
from .contract import (
    PLAIN,
    AttnStatsSpec,
    KeyRanges,
    PoolLayout,
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
from .stats import (
    A_LOCAL,
    A_SINK_KEYS,
    ARGMAX,
    ASHAPE,
    DIAG,
    DIST,
    DUP,
    ENTROPY,
    FINAL,
    HIST_ALL,
    HIST_LOG,
    INDUCTION,
    LEARNED_SINK,
    MOMENTS,
    N_DIST_BUCKETS,
    OBS_WINDOW,
    PREV,
    RECV_MAX,
    RECV_SUM,
    ROWMAX,
    SINK,
    SPAN,
    THUMB,
    VECTORS,
    WINDOW_RECV,
)

__all__ = ["attn_stats_torch"]

_SEPARATE_PRODUCTS_KEYS = 512  # from this many keys a block's products are made one per (batch row, key head)
_NEG = -1.0e30  # finite "minus infinity": p = exp(_NEG - lse) == 0 and p * log p == 0, never NaN
_POW2 = torch.tensor([2**k for k in range(N_DIST_BUCKETS + 1)], dtype=torch.long)  # [33]
_LN10 = math.log(10.0)


def _prefix(cs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sum of the first ``idx`` columns of each row, from the inclusive prefix sum ``cs`` (idx in [0, Lk])."""
    got = cs.gather(-1, (idx - 1).clamp_min(0))
    return torch.where(idx > 0, got, 0.0)


def attn_stats_torch(
    q: torch.Tensor,  # [B, H, L, D]
    k: torch.Tensor,  # [B, H_kv, L, D]
    scaling: float,
    ranges: KeyRanges,
    spec: AttnStatsSpec = AttnStatsSpec(),
    block_q: int = 128,
    use_numba: bool | None = None,
    tokens: torch.Tensor | None = None,  # [B, L] token ids for the head-role masses (None: no repeats)
    lse: torch.Tensor | None = None,  # [B, H, L] float32 log-sum-exp of each row, from the forward attention
    mod: ScoreMod = PLAIN,  # the model's logit softcapping and learned sinks
    spans: Sequence[Spans | None] | None = None,  # per batch row its named spans (``contract.validate_spans``)
) -> dict[str, torch.Tensor]:
    """Every attention statistic of the contract (see ``reference.attn_stats_ref`` for the outputs).

    ``use_numba`` (default: when numba is installed and q is on the CPU) picks the fused Numba pass; False keeps
    every step in torch. With ``lse`` (which then includes the softcapping and the sink) the statistics skip their
    own max/sum pass over each row.
    """
    validate_qk(q, k, ranges)
    lse = validate_lse(lse, q)
    if use_numba is None:
        use_numba = HAS_NUMBA and q.device.type == "cpu"
    if use_numba:
        if not HAS_NUMBA:
            raise RuntimeError("use_numba=True but numba is not installed")
        return _attn_stats_fused(q, k, scaling, ranges, spec, block_q, tokens, lse, mod, spans)
    B, H, L, D = q.shape
    tokens = resolve_tokens(tokens, B, L, q.device)  # [B, L]
    tok_before = previous_tokens(tokens, ranges)  # [B, L]
    Hkv = k.shape[1]
    group = H // Hkv
    dev = q.device
    start = ranges.start.to(dev)  # [B]
    end = ranges.end.to(dev)  # [B]
    W = ranges.span  # the widest key range of a row (window or chunk), or None
    R = spec.thumb_size
    f32 = dict(device=dev, dtype=torch.float32)
    sink_logit = mod.sink_logits(H, dev)  # [H] or None

    vec = {s: torch.zeros(B, H, L, **f32) for s in VECTORS}
    hist_all = torch.zeros(H, spec.bins, dtype=torch.long)
    hist_log = torch.zeros(H, spec.bins, dtype=torch.long)
    moments = torch.zeros(H, 3, dtype=torch.float64)
    dist = torch.zeros(B, H, N_DIST_BUCKETS, dtype=torch.float64, device=dev)
    layout = pool_layout(ranges, L, R, spans)  # the thumbnail's cells, cut at the spans' boundaries
    P = layout.P
    thumb = torch.zeros(B, H, P, P, dtype=torch.float64, device=dev)
    edges, row_cell = layout.edges.to(dev), layout.cell.to(dev)  # [B, P + 1], [B, L]
    final_row = end - 1  # [B]

    kf = k.float()  # [B, Hkv, L, D]
    for i0 in range(0, L, block_q):
        i1 = min(L, i0 + block_q)
        kstart = 0 if W is None else max(0, i0 - W + 1)
        Lk = i1 - kstart
        rows = torch.arange(i0, i1, device=dev)  # [R_blk] absolute query positions
        cols = torch.arange(kstart, i1, device=dev)  # [Lk] absolute key positions

        # -- allowed key range per (batch, row) --
        row_ok = (rows[None, :] >= start[:, None]) & (rows[None, :] < end[:, None])  # [B, R_blk]
        lo = ranges.lo(rows)  # [B, R_blk]
        hi = torch.where(row_ok, rows[None, :] + 1, lo)  # [B, R_blk] exclusive; hi == lo: no key
        allowed = (cols >= lo[:, :, None]) & (cols < hi[:, :, None])  # [B, R_blk, Lk]

        # -- scores, log-sum-exp, p --
        qb = q[:, :, i0:i1].float().view(B, Hkv, group, i1 - i0, D)  # [B, Hkv, G, R_blk, D]
        s = torch.matmul(qb, kf[:, :, None, kstart:i1].transpose(-1, -2))  # [B, Hkv, G, R_blk, Lk]
        s = mod.cap(s.view(B, H, i1 - i0, Lk).mul_(scaling))  # [B, H, R_blk, Lk]
        # only two column bands can hold a masked entry: the causal square on the right, and on the left the
        # columns before the latest padding start or window start of any row (a chunk start: any column)
        c0 = i0 - kstart
        s[..., c0:].masked_fill_(~allowed[:, None, :, c0:], _NEG)
        left = max(int(start.max()) - kstart, 0 if ranges.window is None else i1 - ranges.window - kstart)
        left = c0 if ranges.chunk is not None else min(max(left, 0), c0)
        if left:
            s[..., :left].masked_fill_(~allowed[:, None, :, :left], _NEG)
        all_rows = bool(row_ok.all())
        if not all_rows:
            s.masked_fill_(~row_ok[:, None, :, None], _NEG)
        if lse is None:
            m = s.amax(-1, keepdim=True)  # [B, H, R_blk, 1]
            if sink_logit is not None:
                m = torch.maximum(m, sink_logit.view(1, H, 1, 1))
        else:  # the forward's lse in place of the max: p = exp(s - lse) sums to 1 up to its rounding
            m = torch.where(row_ok[:, None], lse[:, :, i0:i1], _NEG)[..., None]  # [B, H, R_blk, 1]; as amax there
        d = s.sub_(m)  # [B, H, R_blk, Lk] s - m, in place; masked: ~_NEG
        p = torch.exp(d)  # [B, H, R_blk, Lk] unnormalised
        z = p.sum(-1, keepdim=True)  # [B, H, R_blk, 1]
        if sink_logit is not None:
            zs = torch.exp(sink_logit.view(1, H, 1, 1) - m)  # the sink's term of the denominator
            z = z + zs  # with the forward's lse z ~ 1: dividing by it keeps each row exact whatever lse's rounding
        p.div_(z)
        logz = torch.log(z)  # [B, H, R_blk, 1]; log p = d - logz
        if sink_logit is None:
            ent = logz.squeeze(-1) - torch.linalg.vecdot(p, d)  # H = log z - sum p (s - m)
        else:  # the weights sum to 1 - the sink's share
            ent = logz.squeeze(-1) * p.sum(-1) - torch.linalg.vecdot(p, d)
            share = (zs / z).squeeze(-1)  # [B, H, R_blk]
        rowmax = (
            p.amax(-1) if lse is not None or sink_logit is not None else z.reciprocal().squeeze(-1)
        )  # max p = 1 / z
        if not all_rows:  # a row with no allowed key: every statistic is 0
            p.mul_(row_ok[:, None, :, None])
            ent = torch.where(row_ok[:, None], ent, 0.0)
            rowmax = torch.where(row_ok[:, None], rowmax, 0.0)
        if sink_logit is not None:
            vec[LEARNED_SINK][:, :, i0:i1] = torch.where(row_ok[:, None], share, 0.0)

        # -- row statistics --
        vec[ENTROPY][:, :, i0:i1] = ent
        vec[ROWMAX][:, :, i0:i1] = rowmax
        vec[DIAG][:, :, i0:i1] = torch.diagonal(p, offset=i0 - kstart, dim1=-2, dim2=-1)
        prev_col = (rows - 1 - kstart).clamp_min(0)  # [R_blk]
        prev = p.gather(-1, prev_col.view(1, 1, -1, 1).expand(B, H, -1, 1)).squeeze(-1)  # [B, H, R_blk]
        vec[PREV][:, :, i0:i1] = torch.where((rows - 1 >= kstart)[None, None], prev, 0.0)
        sink_col = (start - kstart).clamp(0, Lk - 1)  # [B]
        sink = p.gather(-1, sink_col.view(B, 1, 1, 1).expand(B, H, i1 - i0, 1)).squeeze(-1)  # [B, H, R_blk]
        vec[SINK][:, :, i0:i1] = torch.where((start >= kstart)[:, None, None], sink, 0.0)
        arg = p.argmax(-1) + (kstart - start)[:, None, None]  # [B, H, R_blk] the first maximum, from start
        vec[ARGMAX][:, :, i0:i1] = torch.where(row_ok[:, None], arg.float(), 0.0)
        # -- head-role masses: p summed over the earlier keys holding the query's token (or after it) --
        tq = tokens[:, i0:i1, None]  # [B, R_blk, 1]
        earlier = cols[None, :] < rows[:, None]  # [R_blk, Lk]
        same = (tq == tokens[:, None, kstart:i1]) & earlier  # [B, R_blk, Lk]
        vec[DUP][:, :, i0:i1] = (p * same[:, None]).sum(-1)
        after = (tq == tok_before[:, None, kstart:i1]) & earlier  # [B, R_blk, Lk]
        vec[INDUCTION][:, :, i0:i1] = (p * after[:, None]).sum(-1)
        keep = (cols[None, None, :] < start[:, None, None] + A_SINK_KEYS) | (rows[:, None] - cols[None, :] < A_LOCAL)
        vec[ASHAPE][:, :, i0:i1] = (p * keep[:, None]).sum(-1)  # keep: [B, R_blk, Lk]
        for b in torch.nonzero((final_row >= i0) & (final_row < i1)).flatten().tolist():
            vec[FINAL][b, :, kstart:i1] = p[b, :, int(final_row[b]) - i0]

        # -- column statistics (attention received; from the observation window of the last rows) --
        vec[RECV_SUM][:, :, kstart:i1] += p.sum(2)
        win = row_ok & (rows[None, :] >= end[:, None] - OBS_WINDOW)  # [B, R_blk]
        if bool(win.any()):
            vec[WINDOW_RECV][:, :, kstart:i1] += (p * win[:, None, :, None]).sum(2)
        torch.maximum(vec[RECV_MAX][:, :, kstart:i1], p.amax(2), out=vec[RECV_MAX][:, :, kstart:i1])

        # -- histograms and moments --
        lo_c, hi_c = lo.contiguous().cpu(), hi.contiguous().cpu()
        _hist_block(p.cpu(), d.cpu(), logz.squeeze(-1).cpu(), lo_c, hi_c, kstart, spec, hist_all, hist_log, moments)

        # -- distance buckets and thumbnail: differences of one prefix sum along the keys --
        cs = p.cumsum(-1)  # [B, H, R_blk, Lk]; sum of the columns < c is cs[..., c - 1] (0 for c == 0)
        # bucket k holds keys j with i - j + 1 in [2^k, 2^(k+1)): j in [i + 2 - 2^(k+1), i + 2 - 2^k)
        dedge = (rows[:, None] + 2 - _POW2.to(dev)[None, :] - kstart).clamp(0, Lk)  # [R_blk, 33], decreasing
        at = _prefix(cs, dedge[None, None].expand(B, H, -1, -1))  # [B, H, R_blk, 33]
        dist += (at[..., :-1] - at[..., 1:]).sum(dim=2).double()  # [B, H, 32]
        tedge = (edges - kstart).clamp(0, Lk)  # [B, R + 1]
        at = _prefix(cs, tedge[:, None, None, :].expand(B, H, i1 - i0, P + 1))  # [B, H, R_blk, P + 1]
        colpool = (at[..., 1:] - at[..., :-1]).double()  # [B, H, R_blk, P] row sums per column cell
        rc = row_cell[:, i0:i1]  # [B, R_blk]
        for b in range(B):
            ok = rc[b] >= 0
            if bool(ok.any()):
                thumb[b].index_add_(1, rc[b][ok], colpool[b][:, ok])

    out = {HIST_ALL.name: hist_all, HIST_LOG.name: hist_log, MOMENTS.name: moments, DIST.name: dist.cpu()}
    out.update({s.name: v for s, v in vec.items()})
    return _pooled(out, thumb.cpu(), ranges, layout)


def _hist_block(
    p: torch.Tensor,  # [B, H, R, Lk] float32 probabilities of one query block
    d: torch.Tensor,  # [B, H, R, Lk] float32 with log p = d - logz
    logz: torch.Tensor,  # [B, H, R] float32
    lo: torch.Tensor,  # [B, R] int64 first allowed key of each row (absolute)
    hi: torch.Tensor,  # [B, R] int64 one past the last allowed key (absolute; hi <= lo: none)
    kstart: int,  # absolute position of column 0 of the block
    spec: AttnStatsSpec,
    hist_lin: torch.Tensor,  # [H, bins] int64, accumulated in place
    hist_log: torch.Tensor,  # [H, bins] int64, accumulated in place
    mom: torch.Tensor,  # [H, 3] float64 (n, sum p, sum p^2), accumulated in place
) -> None:
    """Add the allowed entries of one block to the linear and log10 histograms and the moments."""
    B, H, R, Lk = p.shape
    bins = spec.bins
    col = torch.arange(kstart, kstart + Lk)  # [Lk]
    allowed = (col >= lo[:, :, None]) & (col < hi[:, :, None])  # [B, R, Lk]
    for h in range(H):
        v = p[:, h][allowed]  # [n] float32
        lv = (d[:, h] - logz[:, h, :, None])[allowed]
        hist_lin[h] += torch.bincount((v * bins).long().clamp_max(bins - 1), minlength=bins)
        x = (lv / _LN10 - spec.log_min) * (bins / -spec.log_min)
        hist_log[h] += torch.bincount(torch.where(x > 0, x, 0).long().clamp_max(bins - 1), minlength=bins)
        mom[h, 0] += v.numel()
        mom[h, 1] += v.double().sum()
        mom[h, 2] += (v.double() ** 2).sum()


def _attn_stats_fused(
    q: torch.Tensor,  # [B, H, L, D] on the CPU
    k: torch.Tensor,  # [B, H_kv, L, D]
    scaling: float,
    ranges: KeyRanges,
    spec: AttnStatsSpec,
    block_q: int,
    tokens: torch.Tensor | None,  # [B, L]
    lse: torch.Tensor | None,  # [B, H, L] float32
    mod: ScoreMod,
    spans: Sequence[Spans | None] | None = None,
) -> dict[str, torch.Tensor]:
    """The CPU path: per query block one matmul into a reused buffer, then one fused Numba pass."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    W = ranges.span  # the widest key range of a row (window or chunk), or None
    sink = mod.sink_logits(H, q.device)  # [H] or None
    R = spec.thumb_size
    Rs = min(R, L)  # a prompt of n <= L tokens has min(R, n) cells a side: the thumbnails are [B, H, Rs, Rs]
    tokens = resolve_tokens(tokens, B, L, q.device)  # [B, L]
    start = ranges.start.cpu().long()  # [B]
    end = ranges.end.cpu().long()  # [B]
    layout = pool_layout(ranges, L, Rs, spans)  # the thumbnail's cells, cut at the spans' boundaries
    row_cell = layout.cell.contiguous().numpy()  # [B, L]
    state = FusedState(B, H, L, spec.bins, layout.P, spec.log_min)
    tok = tokens.cpu().contiguous().numpy()  # [B, L] int64
    prev_same, n_before = previous_occurrence(tok)  # [B, L], [B, L]
    common = dict(
        start=start.numpy(),
        final_row=(end - 1).numpy(),
        tokens=tok,
        prev_same=prev_same,
        n_before=n_before,
        cell=row_cell,
        bins=spec.bins,
        log_min=spec.log_min,
    )
    # with the forward's lse, one matmul gives log p directly: [scaling q_i, -lse_i] . [k_j, 1] = s_ij - lse_i
    # (not through a softcap: tanh comes between the matmul and the lse)
    qs = q.float() * scaling  # [B, H, L, D]
    kf = k.float()  # [B, Hkv, L, D]
    if lse is not None:
        real = (torch.arange(L)[None, :] >= start[:, None]) & (torch.arange(L)[None, :] < end[:, None])  # [B, L]
        lse = torch.where(real[:, None], lse, 0.0)  # [B, H, L]; rows without keys: unused, not NaN
    fold_lse = lse is not None and mod.softcap is None
    if fold_lse:
        qs = torch.cat([qs, -lse[..., None]], dim=-1)  # [B, H, L, D + 1]
        kf = torch.cat([kf, torch.ones(B, Hkv, L, 1)], dim=-1)  # [B, Hkv, L, D + 1]
    De = qs.shape[-1]
    kspan = L if W is None else min(L, block_q + W - 1)  # widest key range of a block
    if min(block_q, L) * kspan >= 2**31:  # the Numba pass counts pairs of one head in int32 between folds
        raise ValueError(f"block_q * keys per block must stay under 2^31, got {min(block_q, L)} x {kspan}")
    buf = torch.empty(B * H * min(block_q, L) * kspan, dtype=torch.float32)  # log p of one block (reused)
    for i0 in range(0, L, block_q):
        i1 = min(L, i0 + block_q)
        kstart = 0 if W is None else max(0, i0 - W + 1)
        Rb, Lk = i1 - i0, i1 - kstart
        rows = torch.arange(i0, i1)  # [R_blk]
        row_ok = (rows[None, :] >= start[:, None]) & (rows[None, :] < end[:, None])  # [B, R_blk]
        lo = ranges.lo(rows)  # [B, R_blk]
        hi = torch.where(row_ok, rows[None, :] + 1, lo)  # [B, R_blk] exclusive; hi == lo: no key

        # -- scores s = (scaling q) . k (or log p = s - lse) into the reused buffer --
        # the G query heads of a key head stacked as the rows of one product (a broadcast over G would make torch
        # expand the keys G times: ~1/3 slower at 8k); long rows: one oneDNN product per (batch row, key head), copied
        # in; short ones (a batch of short prompts makes hundreds of tiny products): one batched matmul
        qb = qs[:, :, i0:i1].reshape(B, Hkv, group * Rb, De)  # [B, Hkv, G R_blk, De]
        blocks = buf[: B * H * Rb * Lk].view(B * Hkv, group * Rb, Lk)
        if Lk >= _SEPARATE_PRODUCTS_KEYS:
            for j in range(B * Hkv):
                blocks[j].copy_(linear(qb[j // Hkv, j % Hkv], kf[j // Hkv, j % Hkv, kstart:i1]))  # [G R_blk, Lk]
        else:
            torch.matmul(qb, kf[:, :, kstart:i1].transpose(-1, -2), out=blocks.view(B, Hkv, group * Rb, Lk))
        if not fold_lse:  # the scores become log p in torch, in place
            d = blocks.view(B, H, Rb, Lk)
            mod.cap(d)
            if lse is not None:
                row_lse = lse[:, :, i0:i1, None]  # [B, H, R_blk, 1]
            else:  # lse from the block with its disallowed keys masked (and the sink's term)
                cols = torch.arange(kstart, i1)  # [Lk]
                allowed = (cols >= lo[:, :, None]) & (cols < hi[:, :, None])  # [B, R_blk, Lk]
                d.masked_fill_(~allowed[:, None], _NEG)
                row_lse = torch.logsumexp(d, -1, keepdim=True)  # [B, H, R_blk, 1]
                if sink is not None:
                    row_lse = torch.logaddexp(row_lse, sink.view(1, H, 1, 1))
            d.sub_(row_lse)  # [B, H, R_blk, Lk] log p, in place
        elif sink is not None:
            row_lse = lse[:, :, i0:i1, None]
        share = None  # the learned sink's share of each row
        if sink is not None:
            share = torch.where(row_ok[:, None], torch.exp(sink.view(1, H, 1) - row_lse[..., 0]), 0.0)
        fused_block(state, blocks, lo, hi, share, i0, kstart, **common)

    state.close(row_cell)
    hist = torch.from_numpy(state.hist)  # [H, 2, bins]
    out = {
        HIST_ALL.name: hist[:, 0].contiguous(),
        HIST_LOG.name: hist[:, 1].contiguous(),
        MOMENTS.name: torch.from_numpy(state.mom).sum(0),
        DIST.name: torch.from_numpy(state.dist),
    }
    out.update({s.name: torch.from_numpy(state.vec[s.slot]) for s in VECTORS})
    return _pooled(out, torch.from_numpy(state.thumb), ranges, layout)


def _pooled(out: dict, sums: torch.Tensor, ranges: KeyRanges, layout: PoolLayout) -> dict:
    """``out`` with the thumbnail and the span attention from the pooled sums [B, H, P, P]."""
    out[THUMB.name] = pooled_thumbnail(sums, layout)
    if layout.spans is not None:
        out[SPAN.name] = span_attention(sums, out[ARGMAX.name], ranges, layout)
    return out
