"""The post-matmul work of one query block on the CPU in a single Numba pass, parallel over heads.

Before it, torch forms log p over the block (``torch_path._attn_stats_fused``): with the forward's lse,
log p = [scaling q_i, -lse_i] . [k_j, 1] comes straight out of the block's matmuls (for rows of 512 keys or more one
per (batch row, key head) through ``_cpu_gemm.linear``, copied into one reused buffer: reading the separate products
where they lay, as a typed list, was slower in a fresh process and raised the peak; for shorter ones one batched
matmul into it, since a batch of short prompts makes hundreds of tiny products); without it, torch finds lse
(``torch.logsumexp`` over the masked scores) and subtracts it. The Numba pass then takes each row i over its allowed
keys j in [lo, hi), forms p = exp(log p) in a vectorised float32 exp of its own (Numba has no vector exp), and reduces
the row to every statistic of the contract, in loops that LLVM vectorises (each over one contiguous run of keys, with
no store that could alias a load it has to check at run time):

- per distance bucket (a handful per row): sum p, sum p log p, sum p^2 and the row max (an int32 max over the bits:
  p >= 0 orders like its bits) -> entropy, row max, moments, distance buckets;
- attention received: one add (and max) per pair into a per-key sum over the rows of the current thumbnail row cell,
  moved into ``recv_sum`` and that thumbnail row when the rows reach the next cell (so the thumbnail costs no pass);
- histograms: one counter per pair, not one per view: the linear bin a and the log10 bin b of a pair add up to its
  cell a + b of the common refinement of the two binnings (``union_cells``), counted in one scalar loop (the only
  scatter, about a third of the pass); both histograms are summed from those cells exactly when the counts fold;
- duplicate/induction masses: a token with few earlier copies follows links to them (``previous_occurrence``); a
  frequent one compares every key.

Numba is imported on first use (not with attnscope.kernels). The thread count follows torch's
(``torch.get_num_threads()``), so torch and Numba never ask for more threads than the user gave
(``set_cpu_threads``); the two never run at the same time (Numba runs between torch's matmuls). Where Numba's
OpenMP layer loads the same libgomp as torch (as with the PyPI CPU wheels) they even share one thread pool; its
launches set the OpenMP thread count, so torch's is put back after each call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math

import numpy as np
import torch

from .stats import (
    A_LOCAL,
    A_SINK_KEYS,
    ARGMAX,
    ASHAPE,
    DIAG,
    DUP,
    ENTROPY,
    FINAL,
    INDUCTION,
    LEARNED_SINK,
    N_DIST_BUCKETS,
    OBS_WINDOW,
    PREV,
    RECV_MAX,
    RECV_SUM,
    ROWMAX,
    SINK,
    VECTORS,
    WINDOW_RECV,
)

HAS_NUMBA = importlib.util.find_spec("numba") is not None

__all__ = ["HAS_NUMBA", "FusedState", "fused_block", "previous_occurrence", "set_cpu_threads"]

_LN10 = math.log(10.0)
# exp in float32 (module constants: Numba freezes them when it compiles)
_LOG2E = np.float32(1.0 / math.log(2.0))
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with few bits so n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.33)  # below: p < 2^-126, flushed to 0
_EXP_FLUSH = np.float32(-88.0)  # its n is -127
_F0, _F1, _F2, _F3, _F4, _F5, _F6, _F7 = (np.float32(1.0 / math.factorial(k)) for k in range(8))  # 1 / k!
prange = range  # numba.prange once the loop is compiled (Numba reads module globals when it compiles)
# the slots of the [V, B, H, L] vector output (module globals: Numba freezes them as constants)
_DIAG, _FINAL, _ENTROPY, _ROWMAX = DIAG.slot, FINAL.slot, ENTROPY.slot, ROWMAX.slot
_RECV_SUM, _RECV_MAX, _SINK, _PREV, _DUP, _INDUCTION, _LEARNED_SINK, _ARGMAX = (
    RECV_SUM.slot, RECV_MAX.slot, SINK.slot, PREV.slot, DUP.slot, INDUCTION.slot, LEARNED_SINK.slot, ARGMAX.slot
)  # fmt: skip
_WINDOW_RECV, _OBS_WINDOW = WINDOW_RECV.slot, OBS_WINDOW
_ASHAPE, _A_SINK_KEYS, _A_LOCAL = ASHAPE.slot, A_SINK_KEYS, A_LOCAL
_A_LOCAL_BUCKETS = A_LOCAL.bit_length() - 1  # distance buckets 0 .. this - 1: keys i - j + 1 < A_LOCAL
assert A_LOCAL == 1 << _A_LOCAL_BUCKETS, "the A-shape window is summed from whole distance buckets"
_compiled = None
_close_cells = None
_fold_counts = None
_flush_cell = None  # the jitted _flush_cell_py once compiled (the kernels call it by this name)


def set_cpu_threads(n: int | None) -> None:
    """Use ``n`` CPU threads for torch and for the Numba pass (None: leave torch's count as it is)."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(int(n))
    if _compiled is not None:
        _sync_numba_threads()


def previous_occurrence(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position of each row of ``tokens`` [B, L]: the previous position holding the same token (-1: none),
    and how many earlier positions hold it, both [B, L] int64.

    Following the links from a query visits exactly the earlier keys that repeat its token, so the duplicate and
    induction masses of a rare token cost its few repeats, not a pass over every key.
    """
    B, L = tokens.shape
    order = np.argsort(tokens, axis=1, kind="stable")  # positions grouped by token, in order within a group
    grouped = np.take_along_axis(tokens, order, 1)
    same = grouped[:, 1:] == grouped[:, :-1]  # [B, L - 1]
    prev = np.full((B, L), -1, np.int64)
    b, t = np.nonzero(same)
    prev[b, order[b, t + 1]] = order[b, t]
    idx = np.broadcast_to(np.arange(L), (B, L))
    first = np.maximum.accumulate(np.where(np.concatenate([np.zeros((B, 1), bool), same], 1), 0, idx), axis=1)
    count = np.empty((B, L), np.int64)
    np.put_along_axis(count, order, idx - first, 1)
    return prev, count


def _sync_numba_threads() -> int:
    """Give Numba torch's thread count; returns that count."""
    import numba

    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return n


@contextlib.contextmanager
def numba_threads():
    """Numba launches inside run on torch's thread count, and torch's count is put back after them (Numba's OpenMP
    layer may share torch's runtime and reset it)."""
    n = _sync_numba_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def union_cells(bins: int, log_min: float) -> tuple[np.ndarray, np.ndarray]:
    """The common refinement of the linear binning of p (``bins`` bins on [0, 1]) and the log10 one (``bins`` bins of
    log10 p on [log_min, 0], smaller p in bin 0): the linear bin and the log10 bin of each of its 2 bins - 1 cells.

    Both bins are nondecreasing in p, so as p grows from 0 to 1 the pair (a, b) steps through the cells one edge at
    a time (both at once where two edges coincide) and a + b numbers them: a pair's cell is a + b, counted once, and
    each histogram is a sum over whole runs of cells. Exact: a pair is counted in the bins it was given (a pair whose
    a and b straddle a tie of two edges by rounding counts in the neighbouring bin, as it could in either binning).
    """
    lin_edges = np.arange(1, bins) / bins  # inner edges, p = k / bins
    log_edges = 10.0 ** (log_min + np.arange(1, bins) * (-log_min / bins))
    edges = np.concatenate([lin_edges, log_edges])
    is_lin = np.arange(2 * bins - 2) < bins - 1
    order = np.argsort(edges, kind="stable")  # a tie: the linear edge first
    lin = np.concatenate([[0], np.cumsum(is_lin[order])])  # [2 bins - 1]
    return lin, np.arange(2 * bins - 1) - lin


class FusedState:
    """Accumulators of one layer, filled block by block: per (batch row, head), and the histograms per head; each
    head is one task (its batch rows in turn), so nothing is written by two threads."""

    def __init__(self, B: int, H: int, L: int, bins: int, R: int, log_min: float):
        self.vec = np.zeros((len(VECTORS), B, H, L), np.float32)  # [V, B, H, L], slot order
        self.hist = np.zeros((H, 2, bins), np.int64)  # linear, log10, summed over the batch rows
        # the loop counts the 2 bins - 1 cells of both binnings (``union_cells``) into int32 (half the cache
        # footprint of int64), two copies by key parity: neighbouring keys often share a cell and alternating copies
        # breaks the store-to-load chain on one counter; they are folded into ``hist`` before they can overflow.
        # Per head, not per (b, h): short prompts come in big batches
        self.hist32 = np.zeros((H, 2, 2 * bins), np.int32)
        self._cells = _cell_bins(bins, log_min)  # [2, 2 bins - 1]: the linear and the log10 bin of each cell
        self.pending = 0  # pairs counted into hist32 of one head since the last fold

        self.mom = np.zeros((B, H, 3), np.float64)  # n, sum p, sum p^2
        self.dist = np.zeros((B, H, N_DIST_BUCKETS), np.float64)
        self.thumb = np.zeros((B, H, R, R), np.float64)
        # attention received per key from the rows of the open thumbnail row cell: added to recv_sum and to the
        # thumbnail when the rows reach the next cell (one vectorised add per pair instead of two)
        self.cell_recv = np.zeros((B, H, L), np.float32)
        self.open_cell = np.full((B, H, 3), -1, np.int64)  # that cell and its span of keys [lo, hi)
        self.fscratch = np.empty((H, 2, L), np.float32)  # per head: p and 2^n of one row
        self.iscratch = np.empty((H, 2, L), np.int32)  # per head: the cells of one row, a bit pattern

    def close(self, cell: np.ndarray) -> None:
        """End of the layer: flush the open row cells (``cell`` [B, L] as given to ``fused_block``), fold the
        histograms."""
        _kernel()
        with numba_threads():
            _close_cells(self.vec, self.thumb, cell, self.cell_recv, self.open_cell)
        self.fold()

    def fold(self) -> None:
        """Move the int32 counts into the int64 histograms (one pass, and they are zero again)."""
        _kernel()
        _fold_counts(self.hist32, self.hist, self._cells)
        self.pending = 0


@functools.lru_cache(maxsize=8)
def _cell_bins(bins: int, log_min: float) -> np.ndarray:
    cells = np.stack(union_cells(bins, log_min)).astype(np.int64)
    cells.flags.writeable = False  # shared by every state of these bins
    return cells


def _fold_counts_py(hist32, hist, cells):  # pragma: no cover - jitted
    """hist [H, 2, bins] += the counts of hist32 [H, 2 copies, 2 bins] by cell (``cells``: each one's two bins);
    hist32 is zeroed."""
    H = hist32.shape[0]
    for h in range(H):
        for c in range(cells.shape[1]):
            n = np.int64(hist32[h, 0, c]) + np.int64(hist32[h, 1, c])
            hist[h, 0, cells[0, c]] += n
            hist[h, 1, cells[1, c]] += n
        hist32[h] = 0


def _flush_cell_py(acc, rsum, thb, cel, rc, lo, hi):  # pragma: no cover - jitted
    """Move the pending attention of row cell ``rc`` (acc[j], keys j in [lo, hi)) into that thumbnail row and into
    the attention received, and clear it."""
    for j in range(lo, hi):
        x = acc[j]
        thb[rc, cel[j]] += x
        rsum[j] += x
        acc[j] = 0.0


def _fused_block_py(
    blocks,  # [B Hkv, G R_blk, Lk] float32 log p = s - lse of the block's rows per (batch row, key head), the G query
    # heads of that key head one after the other (garbage outside the allowed keys)
    lo,  # [B, R_blk] int64 first allowed key (absolute)
    hi,  # [B, R_blk] int64 one past the last allowed key (absolute; hi <= lo: no key)
    sink_share,  # [B, H, R_blk] float32 exp(sink - lse) of each row (0: no learned sink)
    i0,  # absolute position of row 0 of the block
    kstart,  # absolute position of column 0 of the block
    start,  # [B] int64 first real token
    final_row,  # [B] int64 last real token
    tokens,  # [B, L] int64
    prev_same,  # [B, L] int64 the previous position holding the same token (-1: none)
    n_before,  # [B, L] int64 how many earlier positions hold the same token
    cell,  # [B, L] int64 pooled cell of each position (-1: padding; ``contract.PoolLayout``)
    bins,
    log_min,
    vec,  # [V, B, H, L] float32, by slot
    hist,  # [H, 2, 2 bins] int32: counts per cell a + b of the two binnings (``union_cells``), 2 copies
    mom,  # [B, H, 3] float64
    dist,  # [B, H, N_DIST_BUCKETS] float64
    thumb,  # [B, H, P, P] float64 sums of p per pooled cell
    cell_recv,  # [B, H, L] float32 attention from the rows of the current row cell, per key, not yet in thumb/recv_sum
    open_cell,  # [B, H, 3] int64 that row cell and its span of keys [lo, hi) (-1: none)
    fscratch,  # [H, 2, >= Lk] float32
    iscratch,  # [H, 2, >= Lk] int32
):  # pragma: no cover - jitted
    B, RB = lo.shape
    H = sink_share.shape[1]
    G = H // (len(blocks) // B)  # query heads per key head
    scale = np.float32(bins / (-log_min) / _LN10)  # natural log p -> log10 bin units
    fbins = np.float32(bins)
    zero = np.float32(0.0)
    nbm1 = np.int32(bins - 1)
    nc = hist.shape[2]  # the stride of a copy of the cell counts
    for h in prange(H):  # one task per head: its histogram copies are its own, whatever the batch size
        hf = hist[h].reshape(2 * nc)
        # this head's scratch rows (preallocated: an array allocated inside a prange body is never freed)
        p_row = fscratch[h, 0]  # p = exp(log p) of one row's allowed keys
        two_n = fscratch[h, 1]  # 2^n of exp's range reduction, built from its bits
        cells = iscratch[h, 0]  # the histogram cells of one row's p
        bits = iscratch[h, 1, :1]
        for b in range(B):
            st = start[b]
            fr = final_row[b]
            tok = tokens[b]
            prv = prev_same[b]
            cel = cell[b]
            acc = cell_recv[b, h]
            rsum = vec[_RECV_SUM, b, h]
            rmaxi = vec[_RECV_MAX, b, h].view(np.int32)  # p >= 0: the int32 order of the bits is the float order
            fin = vec[_FINAL, b, h]
            dst = dist[b, h]
            thb = thumb[b, h]
            cur, tlo, thi = open_cell[b, h, 0], open_cell[b, h, 1], open_cell[b, h, 2]
            n = 0
            m1 = 0.0
            m2 = 0.0
            for r in range(RB):
                i = i0 + r
                a = lo[b, r]
                e = hi[b, r]
                if e <= a:
                    continue
                m = e - a
                c0 = a - kstart
                ds = blocks[b * (H // G) + h // G][(h % G) * RB + r, c0 : c0 + m]  # log p of the allowed keys; every
                # loop below runs over t in [0, m)
                ps = p_row[:m]
                psi = ps.view(np.int32)
                # -- p = exp(log p), vectorised: log p = n ln 2 + f (Cody-Waite), e^f by its Taylor series to f^7
                # (|f| <= ln 2 / 2: ~2 ulp), 2^n from its bits; p under 2^-126 (log p < -87.33) is 0 --
                tni = two_n.view(np.int32)
                for t in range(m):
                    x = ds[t]
                    x = x if x > _EXP_LO else _EXP_FLUSH
                    nf = np.floor(x * _LOG2E + np.float32(0.5))
                    f = (x - nf * _LN2_HI) - nf * _LN2_LO
                    y = _F7 * f + _F6
                    y = y * f + _F5
                    y = y * f + _F4
                    y = y * f + _F3
                    y = y * f + _F2
                    y = y * f + _F1
                    ps[t] = y * f + _F0
                    tni[t] = (np.int32(nf) + np.int32(127)) << 23  # n = -127 (flushed): bits 0, 2^n = 0
                for t in range(m):
                    ps[t] *= two_n[t]
                # -- row sums by distance bucket (vectorised within a bucket; few buckets per row) --
                kb = 0
                w = i - a + 1
                while w > 1:
                    w >>= 1
                    kb += 1
                pz = 0.0
                pdl = 0.0
                sq = 0.0
                mx = np.int32(0)
                blo = a  # the first bucket that holds the row's max (buckets run in increasing j)
                bhi = a
                near = 0.0  # the keys with i - j + 1 < A_LOCAL (the A-shape's local window less its far end)
                j = a
                while j < e:
                    stop = min(e, i + 2 - (1 << kb))  # bucket kb: keys with i - j + 1 in [2^kb, 2^(kb+1))
                    sp_ = ps[j - a : stop - a]
                    sd_ = ds[j - a : stop - a]
                    si_ = psi[j - a : stop - a]
                    sp = 0.0
                    spd = 0.0
                    spp = 0.0
                    smx = np.int32(0)
                    for t in range(stop - j):
                        x = np.float64(sp_[t])
                        sp += x
                        spd += x * sd_[t]
                        spp += x * x
                        smx = max(smx, si_[t])
                    dst[kb] += sp
                    pz += sp
                    if kb < _A_LOCAL_BUCKETS:
                        near += sp
                    pdl += spd
                    sq += spp
                    if smx > mx:
                        mx = smx
                        blo = j
                        bhi = stop
                    kb -= 1
                    j = stop
                arg = a  # the first key holding the max: one scan of that bucket
                for t in range(blo - a, bhi - a):
                    if psi[t] == mx:
                        arg = a + t
                        break
                # -- attention received: per key, pooled over the rows of one thumbnail row cell (vectorised) --
                rc = cel[i]
                if rc != cur:
                    if cur >= 0:
                        _flush_cell(acc, rsum, thb, cel, cur, tlo, thi)
                    cur, tlo, thi = rc, a, e
                else:
                    tlo = min(tlo, a)
                    thi = max(thi, e)
                acc_s = acc[a:e]
                rmax_s = rmaxi[a:e]
                for t in range(m):
                    acc_s[t] += ps[t]
                    rmax_s[t] = max(rmax_s[t], psi[t])
                # -- histograms: each pair's cell (its linear bin + its log10 bin) computed vectorised, then
                # counted; copies by key parity break the store-to-load chains on one counter --
                for t in range(m):
                    x = ds[t] * scale + fbins  # log10-bin coordinate (log10 p - log_min) * bins / -log_min
                    cells[t] = min(np.int32(ps[t] * fbins), nbm1) + min(np.int32(x if x > zero else zero), nbm1)
                for t in range(m):
                    hf[(t & 1) * nc + cells[t]] += 1
                # -- head-role masses: earlier keys j != i with token[j] == token[i] (duplicate) and
                # token[j - 1] == token[i] (induction) --
                tq = tok[i]
                dup = 0.0
                ind = 0.0
                if n_before[b, i] * 16 < m:  # a rare token: follow the links to its earlier occurrences q
                    q = prv[i]
                    while q >= 0 and q >= a - 1:  # keys j = q (duplicate) and j = q + 1 (induction)
                        if q >= a:
                            dup += np.float64(ps[q - a])
                        if q >= st and q + 1 >= a and q + 1 < e and q + 1 != i:
                            ind += np.float64(ps[q + 1 - a])
                        q = prv[q]
                else:  # a frequent one: compare every key (vectorised), then take out j = i
                    ts = tok[a:e]
                    for t in range(m):
                        dup += np.float64(ps[t]) if ts[t] == tq else 0.0
                    j0 = max(a, st + 1)  # token[j - 1] must be a real token
                    if j0 < e:
                        pj = ps[j0 - a : m]
                        tb = tok[j0 - 1 : e - 1]
                        for t in range(e - j0):
                            ind += np.float64(pj[t]) if tb[t] == tq else 0.0
                    if e > i:
                        pii = np.float64(ps[i - a])
                        dup -= pii
                        if j0 <= i and tok[i - 1] == tq:
                            ind -= pii
                if i == fr:
                    fin_s = fin[a:e]
                    for t in range(m):
                        fin_s[t] = ps[t]
                if i > fr - _OBS_WINDOW:  # the observation window: the prompt's last rows
                    win_s = vec[_WINDOW_RECV, b, h, a:e]
                    for t in range(m):
                        win_s[t] += ps[t]
                n += m
                m1 += pz
                m2 += sq
                # row statistics of p / (sum p + the sink's share): exact whatever the rounding of a given lse (the
                # per-key sums above keep it, a relative error of |lse - lse(these scores)|, ~1e-7 |s|)
                sk = np.float64(sink_share[b, h, r])
                z = pz + sk
                inv = 1.0 / z
                bits[0] = mx
                # -sum p' log p' of the normalised row p' = p / z, log p' = log p - log z
                vec[_ENTROPY, b, h, i] = np.float32((np.log(z) * pz - pdl) * inv)
                vec[_LEARNED_SINK, b, h, i] = np.float32(sk * inv)
                vec[_ARGMAX, b, h, i] = np.float32(arg - st)
                vec[_ROWMAX, b, h, i] = np.float32(bits.view(np.float32)[0] * inv)
                vec[_DUP, b, h, i] = np.float32(dup * inv)
                vec[_INDUCTION, b, h, i] = np.float32(ind * inv)
                # A-shape coverage: the first keys, then the local window [i - A_LOCAL + 1, i] after them: that is
                # the distance buckets summed above (``near``) and its far end, key i - A_LOCAL + 1
                s_hi = min(e, st + _A_SINK_KEYS)
                l_lo = max(a, s_hi, i - _A_LOCAL + 1)
                if l_lo <= max(s_hi, a):  # no gap between them: the whole row, already summed
                    cov = pz
                else:  # l_lo = i - A_LOCAL + 1 > a
                    cov = near + np.float64(ps[l_lo - a])
                    for t in range(0, max(s_hi - a, 0)):
                        cov += np.float64(ps[t])
                vec[_ASHAPE, b, h, i] = np.float32(cov * inv)
                if a <= i:
                    vec[_DIAG, b, h, i] = np.float32(ps[i - a] * inv)
                if a <= i - 1:
                    vec[_PREV, b, h, i] = np.float32(ps[i - 1 - a] * inv)
                if a <= st:
                    vec[_SINK, b, h, i] = np.float32(ps[st - a] * inv)
            open_cell[b, h, 0], open_cell[b, h, 1], open_cell[b, h, 2] = cur, tlo, thi
            mom[b, h, 0] += n
            mom[b, h, 1] += m1
            mom[b, h, 2] += m2


def _close_cells_py(vec, thumb, cell, cell_recv, open_cell):  # pragma: no cover - jitted
    """Flush every (batch row, head)'s open row cell at the end of a layer."""
    B, H = open_cell.shape[:2]
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        cur = open_cell[b, h, 0]
        if cur >= 0:
            _flush_cell(
                cell_recv[b, h], vec[_RECV_SUM, b, h], thumb[b, h], cell[b], cur, open_cell[b, h, 1], open_cell[b, h, 2]
            )
            open_cell[b, h, 0] = -1


def _kernel():
    global _compiled, _close_cells, _flush_cell, _fold_counts, prange
    if _compiled is None:
        import numba

        prange = numba.prange
        jit = dict(cache=True, nogil=True, error_model="numpy")
        # reassociation lets LLVM vectorise the float64 row sums; no flag that assumes away NaN or inf
        fastmath = {"reassoc", "nsz", "arcp"}
        _flush_cell = numba.njit(**jit)(_flush_cell_py)
        _close_cells = numba.njit(parallel=True, **jit)(_close_cells_py)
        _fold_counts = numba.njit(**jit)(_fold_counts_py)
        _compiled = numba.njit(parallel=True, fastmath=fastmath, **jit)(_fused_block_py)
    return _compiled


def fused_block(
    state: FusedState,
    blocks: torch.Tensor,  # [B Hkv, G R_blk, Lk] float32 log p (s - lse), batch row major
    lo: torch.Tensor,  # [B, R_blk] int64
    hi: torch.Tensor,  # [B, R_blk] int64
    sink_share: torch.Tensor | None,  # [B, H, R_blk] float32 exp(sink - lse) of each row, or None (no sinks)
    i0: int,
    kstart: int,
    start: np.ndarray,  # [B] int64
    final_row: np.ndarray,  # [B] int64
    tokens: np.ndarray,  # [B, L] int64
    prev_same: np.ndarray,  # [B, L] int64
    n_before: np.ndarray,  # [B, L] int64
    cell: np.ndarray,  # [B, L] int64
    bins: int,
    log_min: float,
) -> None:
    """Reduce one block of log p into ``state`` (see the module docstring)."""
    import numba

    B, RB = lo.shape
    H = state.vec.shape[2]
    if blocks.ndim != 3 or len(blocks) == 0 or H * B % len(blocks) or blocks.shape[1] != H * B // len(blocks) * RB:
        raise ValueError(f"expected [B Hkv, G R_blk, Lk] scores for {B} x {H} heads, got {tuple(blocks.shape)}")
    Lk = blocks.shape[2]
    pairs = B * RB * Lk  # at most this many pairs of one head in this block
    if state.pending + pairs >= 2**31:
        state.fold()
    state.pending += pairs
    fn = _kernel()
    if sink_share is None:
        sink_share = torch.zeros((B, H, RB), dtype=torch.float32)
    chunk = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(1)  # head tasks taken one at a time: a thread descheduled by other load stalls less
    try:
        with numba_threads():
            fn(
                blocks.contiguous().numpy(),
                lo.contiguous().numpy(),
                hi.contiguous().numpy(),
                sink_share.contiguous().numpy(),
                i0,
                kstart,
                start,
                final_row,
                tokens,
                prev_same,
                n_before,
                cell,
                bins,
                log_min,
                state.vec,
                state.hist32,
                state.mom,
                state.dist,
                state.thumb,
                state.cell_recv,
                state.open_cell,
                state.fscratch,
                state.iscratch,
            )
    finally:
        numba.set_parallel_chunksize(chunk)
