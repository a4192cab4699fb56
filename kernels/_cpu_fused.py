"""The post-matmul work of one query block on the CPU in a single Numba pass, parallel over heads.

Before it, torch forms log p and p = exp(log p) over the block (``attn_stats_torch._attn_stats_fused``): with the
forward's lse, log p = [scaling q_i, -lse_i] . [k_j, 1] comes straight out of the block's matmul; without it, torch
finds lse (``torch.logsumexp`` over the masked scores) and subtracts it. ``exp`` stays in torch, vectorised (Numba
has no vector exp without Intel's SVML). The Numba pass then reads log p and p once for each row i and
its allowed keys j in [lo, hi) and reduces them to every statistic of the contract: entropy H_i = -sum_j p_ij
log p_ij, row max, attention received (sum and max per key), the linear and log10 histograms, the moments,
distance buckets, thumbnail cells, the diagonal, previous-token, sink and final-row values, and the
duplicate/induction masses.

Numba is imported on first use (not with attnscope.kernels). The thread count follows torch's
(``torch.get_num_threads()``), so torch and Numba never ask for more threads than the user gave
(``set_cpu_threads``); the two never run at the same time (Numba runs between torch's matmuls). Where Numba's
OpenMP layer loads the same libgomp as torch (as with the PyPI CPU wheels) they even share one thread pool; its
launches set the OpenMP thread count, so torch's is put back after each call.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

HAS_NUMBA = importlib.util.find_spec("numba") is not None

__all__ = ["HAS_NUMBA", "FusedState", "fused_block", "set_cpu_threads"]

_LN10 = math.log(10.0)
prange = range  # numba.prange once the loop is compiled (Numba reads module globals when it compiles)
_compiled = None


def set_cpu_threads(n: int | None) -> None:
    """Use ``n`` CPU threads for torch and for the Numba pass (None: leave torch's count as it is)."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(int(n))
    if _compiled is not None:
        _sync_numba_threads()


def _sync_numba_threads() -> int:
    """Give Numba torch's thread count; returns that count."""
    import numba

    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return n


class FusedState:
    """Accumulators of one layer, filled block by block: per (batch row, head), and the histograms per head; each
    head is one task (its batch rows in turn), so nothing is written by two threads."""

    def __init__(self, B: int, H: int, L: int, bins: int, R: int):
        self.vec = np.zeros((10, B, H, L), np.float32)  # ATTN_VECTOR_STATS order
        self.hist = np.zeros((H, 2, bins), np.int64)  # linear, log10, summed over the batch rows
        # the loop counts into int32 copies (half the cache footprint of int64): 4 linear + 2 log10 per (b, h), since
        # neighbouring keys often share a bin (most p of a long row sit in bin 0) and spreading the increments
        # breaks the store-to-load chain on one counter; they are folded into ``hist`` before they can overflow
        self.hist32 = np.zeros((H, 6, bins), np.int32)  # per head, not per (b, h): short prompts come in big batches
        self.pending = 0  # pairs counted into hist32 of one head since the last fold

        self.mom = np.zeros((B, H, 3), np.float64)  # n, sum p, sum p^2
        self.dist = np.zeros((B, H, 32), np.float64)
        self.thumb = np.zeros((B, H, R, R), np.float64)

    def fold(self) -> None:
        """Move the int32 counts into the int64 histograms."""
        h = self.hist32.astype(np.int64)
        self.hist[:, 0] += h[:, :4].sum(1)
        self.hist[:, 1] += h[:, 4:].sum(1)
        self.hist32[:] = 0
        self.pending = 0


def _fused_block_py(
    dd,  # [B, H, R_blk, Lk] float32 log p = s - lse of the block (garbage outside the allowed keys)
    pp,  # [B, H, R_blk, Lk] float32 p = exp(log p)
    lo,  # [B, R_blk] int64 first allowed key (absolute)
    hi,  # [B, R_blk] int64 one past the last allowed key (absolute; hi <= lo: no key)
    i0,  # absolute position of row 0 of the block
    kstart,  # absolute position of column 0 of the block
    start,  # [B] int64 first real token
    final_row,  # [B] int64 last real token
    tokens,  # [B, L] int32
    tok_before,  # [B, L] int32 token j - 1 at key j (-1: none)
    cell,  # [B, L] int64 thumbnail cell of each position (-1: padding)
    edges,  # [B, R + 1] int64 absolute thumbnail cell edges
    bins,
    log_min,
    vec,  # [10, B, H, L] float32
    hist,  # [H, 6, bins] int32: 4 linear copies, 2 log10 copies, summed over the batch rows
    mom,  # [B, H, 3] float64
    dist,  # [B, H, 32] float64
    thumb,  # [B, H, R, R] float64
):  # pragma: no cover - jitted
    B, H, RB, _ = dd.shape
    scale = np.float32(bins / (-log_min) / _LN10)  # natural log p -> log10 bin units
    fbins = np.float32(bins)
    zero = np.float32(0.0)
    nbm1 = bins - 1
    for h in prange(H):  # one task per head: its histogram copies are its own, whatever the batch size
        lin0 = hist[h, 0]
        lin1 = hist[h, 1]
        lin2 = hist[h, 2]
        lin3 = hist[h, 3]
        lg0 = hist[h, 4]
        lg1 = hist[h, 5]
        for b in range(B):
            st = start[b]
            fr = final_row[b]
            tok = tokens[b]
            tokb = tok_before[b]
            cel = cell[b]
            edg = edges[b]
            rsum = vec[4, b, h]
            rmax = vec[5, b, h]
            fin = vec[1, b, h]
            dst = dist[b, h]
            thb = thumb[b, h]
            n = 0
            m1 = 0.0
            m2 = 0.0
            for r in range(RB):
                i = i0 + r
                a = lo[b, r]
                e = hi[b, r]
                if e <= a:
                    continue
                drow = dd[b, h, r]
                prow = pp[b, h, r]
                tq = tok[i]
                is_final = i == fr
                # -- distance bucket of the first key, and where the next (smaller) bucket begins --
                kb = 0
                w = i - a + 1
                while w > 1:
                    w >>= 1
                    kb += 1
                next_b = i + 2 - (1 << kb)
                zb = 0.0  # sum p up to the last distance-bucket edge
                # -- thumbnail cell of the row and of the first key --
                rc = cel[i]
                cc = cel[a]
                next_c = edg[cc + 1]
                zc = 0.0  # sum p up to the last thumbnail-cell edge
                pz = 0.0  # sum p: 1 up to the rounding of lse against these fp32 scores
                pdl = 0.0  # sum p log p
                pmax = zero
                dup = 0.0
                ind = 0.0
                for j in range(a, e):
                    # -- bucket and cell sums are differences of the running sum pz at their edges --
                    if j >= next_b:
                        dst[kb] += pz - zb
                        zb = pz
                        kb -= 1
                        next_b = i + 2 - (1 << kb)
                    if j >= next_c:
                        thb[rc, cc] += pz - zc
                        zc = pz
                        cc += 1
                        next_c = edg[cc + 1]
                    c = j - kstart
                    d = drow[c]
                    p = prow[c]
                    pd = np.float64(p)
                    pz += pd
                    pdl += pd * d
                    m2 += pd * pd
                    pmax = max(pmax, p)
                    bl = min(int(p * fbins), nbm1)
                    x = max(d * scale + fbins, zero)  # log10-bin coordinate (log10 p - log_min) * bins / -log_min
                    bg = min(int(x), nbm1)
                    q4 = j & 3
                    if q4 == 0:
                        lin0[bl] += 1
                    elif q4 == 1:
                        lin1[bl] += 1
                    elif q4 == 2:
                        lin2[bl] += 1
                    else:
                        lin3[bl] += 1
                    if j & 1:
                        lg1[bg] += 1
                    else:
                        lg0[bg] += 1
                    rsum[j] += p
                    rmax[j] = max(rmax[j], p)
                    # head-role masses without branches (a repeat is unpredictable); j == i is removed after the loop
                    dup += pd * (tok[j] == tq)
                    ind += pd * (tokb[j] == tq)
                dst[kb] += pz - zb
                thb[rc, cc] += pz - zc
                if e > i:  # the diagonal key j = i is no earlier key: out of the head-role masses
                    pi = np.float64(prow[i - kstart])
                    dup -= pi
                    if tokb[i] == tq:
                        ind -= pi
                if is_final:
                    for j in range(a, e):
                        fin[j] = prow[j - kstart]
                n += e - a
                m1 += pz
                # row statistics of p / sum p: exact whatever the rounding of a given lse (the per-key sums above keep
                # it, a relative error of |lse - lse(these scores)|, ~1e-7 |s|)
                inv = 1.0 / pz
                vec[2, b, h, i] = np.float32(np.log(pz) - pdl * inv)  # entropy -sum p log p of the normalised row
                vec[3, b, h, i] = np.float32(pmax * inv)
                vec[8, b, h, i] = np.float32(dup * inv)
                vec[9, b, h, i] = np.float32(ind * inv)
                if a <= i:
                    vec[0, b, h, i] = np.float32(prow[i - kstart] * inv)  # diag
                if a <= i - 1:
                    vec[7, b, h, i] = np.float32(prow[i - 1 - kstart] * inv)  # prev
                if a <= st:
                    vec[6, b, h, i] = np.float32(prow[st - kstart] * inv)  # sink
            mom[b, h, 0] += n
            mom[b, h, 1] += m1
            mom[b, h, 2] += m2


def _kernel():
    global _compiled, prange
    if _compiled is None:
        import numba

        prange = numba.prange
        _compiled = numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")(_fused_block_py)
    return _compiled


def fused_block(
    state: FusedState,
    d: torch.Tensor,  # [B, H, R_blk, Lk] float32 log p (s - lse)
    p: torch.Tensor,  # [B, H, R_blk, Lk] float32 exp(d)
    lo: torch.Tensor,  # [B, R_blk] int64
    hi: torch.Tensor,  # [B, R_blk] int64
    i0: int,
    kstart: int,
    start: np.ndarray,  # [B] int64
    final_row: np.ndarray,  # [B] int64
    tokens: np.ndarray,  # [B, L] int32
    tok_before: np.ndarray,  # [B, L] int32
    cell: np.ndarray,  # [B, L] int64
    edges: np.ndarray,  # [B, R + 1] int64
    bins: int,
    log_min: float,
) -> None:
    """Reduce one block of log p and p into ``state`` (see the module docstring)."""
    import numba

    pairs = d.shape[0] * d.shape[2] * d.shape[3]  # at most this many pairs of one head in this block
    if state.pending + pairs >= 2**31:
        state.fold()
    state.pending += pairs
    fn = _kernel()
    n = _sync_numba_threads()
    chunk = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(1)  # head tasks taken one at a time: a thread descheduled by other load stalls less
    fn(
        d.numpy(),
        p.numpy(),
        lo.contiguous().numpy(),
        hi.contiguous().numpy(),
        i0,
        kstart,
        start,
        final_row,
        tokens,
        tok_before,
        cell,
        edges,
        bins,
        log_min,
        state.vec,
        state.hist32,
        state.mom,
        state.dist,
        state.thumb,
    )
    numba.set_parallel_chunksize(chunk)
    if torch.get_num_threads() != n:  # Numba's OpenMP layer may share torch's runtime and reset its count
        torch.set_num_threads(n)
