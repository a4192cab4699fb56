"""Histogram of one block of attention probabilities on the CPU (Numba when present, torch otherwise).

torch's bincount/histc cost ~8 ns an element on one core, more than every other statistic together;
this loop reads p and s - max once and fills both histograms and the moments at ~3 ns an element on one core.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

# numba is imported on first use, not with attnscope.kernels
HAS_NUMBA = importlib.util.find_spec("numba") is not None

__all__ = ["HAS_NUMBA", "hist_block"]

_LN10 = math.log(10.0)
prange = range  # numba.prange once the loop is compiled (Numba reads module globals when it compiles)
_compiled = None


def _hist_block_py(p, d, logz, lo, hi, kstart, bins, log_min, hist_lin, hist_log, mom):  # pragma: no cover - jitted
    B, H, R, _ = p.shape
    scale = np.float32(bins / (-log_min) / _LN10)  # natural log p -> log10 bin units
    fbins = np.float32(bins)
    zero = np.float32(0.0)
    for h in prange(H):
        # neighbouring pairs often share a bin (most p of a long row sit in bin 0): spreading the increments over
        # 4 (2) private copies breaks the store-to-load chain on one counter, ~2x faster than one histogram
        lin = np.zeros((4, bins), np.int64)
        lg = np.zeros((2, bins), np.int64)
        n = 0
        s1 = 0.0
        s2 = 0.0
        for b in range(B):
            for r in range(R):
                # log10-bin coordinate x = (d - log z) * scale - log_min * bins / -log_min, per-row part first
                off = np.float32((-logz[b, h, r]) * scale + bins)
                prow = p[b, h, r]
                drow = d[b, h, r]
                j0 = lo[b, r] - kstart
                j1 = hi[b, r] - kstart
                if j1 > j0:
                    n += j1 - j0
                for j in range(j0, j1):
                    v = prow[j]
                    lin[j & 3, min(int(v * fbins), bins - 1)] += 1
                    x = max(drow[j] * scale + off, zero)
                    lg[j & 1, min(int(x), bins - 1)] += 1
                    vv = np.float64(v)
                    s1 += vv
                    s2 += vv * vv
        for k in range(bins):
            hist_lin[h, k] += lin[0, k] + lin[1, k] + lin[2, k] + lin[3, k]
            hist_log[h, k] += lg[0, k] + lg[1, k]
        mom[h, 0] += n
        mom[h, 1] += s1
        mom[h, 2] += s2


def _hist_block_nb(*args) -> None:
    """The loop above compiled by Numba (parallel over heads), compiled or loaded from cache on first call."""
    global _compiled, prange
    if _compiled is None:
        import numba

        prange = numba.prange
        _compiled = numba.njit(parallel=True, cache=True, nogil=True)(_hist_block_py)
    _compiled(*args)


def hist_block(
    p: torch.Tensor,  # [B, H, R, Lk] float32 probabilities of one query block
    d: torch.Tensor,  # [B, H, R, Lk] float32 with log p = d - logz
    logz: torch.Tensor,  # [B, H, R] float32
    lo: torch.Tensor,  # [B, R] int64 first allowed key of each row (absolute)
    hi: torch.Tensor,  # [B, R] int64 one past the last allowed key (absolute; hi <= lo: none)
    kstart: int,  # absolute position of column 0 of the block
    bins: int,
    log_min: float,
    hist_lin: torch.Tensor,  # [H, bins] int64, accumulated in place
    hist_log: torch.Tensor,  # [H, bins] int64, accumulated in place
    mom: torch.Tensor,  # [H, 3] float64 (n, sum p, sum p^2), accumulated in place
    use_numba: bool | None = None,
) -> None:
    """Add the allowed entries of one block to the linear and log10 histograms and the moments."""
    if use_numba is None:
        use_numba = HAS_NUMBA
    if use_numba:
        if not HAS_NUMBA:
            raise RuntimeError("use_numba=True but numba is not installed")
        _hist_block_nb(
            p.numpy(),
            d.numpy(),
            logz.contiguous().numpy(),
            lo.numpy(),
            hi.numpy(),
            kstart,
            bins,
            log_min,
            hist_lin.numpy(),
            hist_log.numpy(),
            mom.numpy(),
        )
        return
    B, H, R, Lk = p.shape
    col = torch.arange(kstart, kstart + Lk)  # [Lk]
    allowed = (col >= lo[:, :, None]) & (col < hi[:, :, None])  # [B, R, Lk]
    for h in range(H):
        v = p[:, h][allowed]  # [n] float32
        lv = (d[:, h] - logz[:, h, :, None])[allowed]
        hist_lin[h] += torch.bincount((v * bins).long().clamp_max(bins - 1), minlength=bins)
        x = (lv / _LN10 - log_min) * (bins / -log_min)
        hist_log[h] += torch.bincount(torch.where(x > 0, x, 0).long().clamp_max(bins - 1), minlength=bins)
        mom[h, 0] += v.numel()
        mom[h, 1] += v.double().sum()
        mom[h, 2] += (v.double() ** 2).sum()


def _warmup() -> None:
    """Compile (or load from cache) the Numba loop on a tiny input."""
    if HAS_NUMBA:
        z = np.zeros((1, 1, 1, 1), np.float32)
        i = np.zeros((1, 1), np.int64)
        _hist_block_nb(
            z, z, i, i + 1, 0, 2, -12.0, np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64), np.zeros((1, 3))
        )
