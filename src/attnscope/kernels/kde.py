"""Gaussian KDE estimators for laminar profiles (numpy + Numba; no torch).

``ExactKDE`` equals ``scipy.stats.gaussian_kde(x)(grid)`` (Scott's rule: bw = std(x, ddof=1) * n^(-1/5)) on exact
samples. It sorts the samples once and sums, for each grid point, only the samples within ``cutoff`` bandwidths;
a dropped term weighs less than exp(-cutoff^2 / 2) (5e-32 at the default 12) of a kept one, so the result matches
scipy to rounding wherever the density is not itself negligible. Layers run in parallel under Numba.

``BinnedKDE`` evaluates the same estimator from a histogram of B bins on [0, 1] and the exact moments (n, sum,
sum of squares): every sample is moved to its bin centre, at most h/2 away (h = 1/B), so the density changes by at
most ``h / (2 bw^2 sqrt(2 pi e))`` (half a bin times the steepest slope of the kernel). That is small against the
peak, ~1/(bw sqrt(2 pi)), while bw spans a few bins; below ``min_bins_per_bw`` bins it warns, and the log10
histogram is then the honest view.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

try:
    import numba

    HAS_NUMBA = True
except ImportError:  # pragma: no cover - the NumPy path is tested with use_numba=False
    HAS_NUMBA = False

__all__ = ["HAS_NUMBA", "BinnedKDE", "ExactKDE", "KDEWarning", "scott_bandwidth"]

_SQRT2PI = math.sqrt(2.0 * math.pi)


class KDEWarning(UserWarning):
    """The KDE's inputs make its result less trustworthy (degenerate samples, bandwidth near the bin width)."""


def _rows(idx: list[int]) -> str:
    """``0-3, 7, 9`` for [0, 1, 2, 3, 7, 9]."""
    parts, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def scott_bandwidth(n: float, var: float) -> float:
    """Scott's rule in one dimension: sqrt(var) * n^(-1/5) (var with ddof=1)."""
    return math.sqrt(var) * n ** (-0.2)


def _window_sum_py(xs, starts, counts, grid, bws, cutoff, out):  # pragma: no cover - jitted
    n_sets = starts.shape[0]
    for s in numba.prange(n_sets) if HAS_NUMBA else range(n_sets):
        lo0 = starts[s]
        n = counts[s]
        bw = bws[s]
        if n == 0 or bw <= 0.0:
            continue
        x = xs[lo0 : lo0 + n]
        norm = 1.0 / (n * bw * 2.5066282746310002)
        for g in range(grid.shape[0]):
            a = np.searchsorted(x, grid[g] - cutoff * bw)
            b = np.searchsorted(x, grid[g] + cutoff * bw, side="right")
            acc = 0.0
            for t in range(a, b):
                z = (grid[g] - x[t]) / bw
                acc += math.exp(-0.5 * z * z)
            out[s, g] = acc * norm


_window_sum_nb = numba.njit(parallel=True, cache=True, nogil=True)(_window_sum_py) if HAS_NUMBA else None


def _window_sum_np(xs, starts, counts, grid, bws, cutoff, out):
    for s in range(starts.shape[0]):
        n, bw = int(counts[s]), float(bws[s])
        if n == 0 or bw <= 0.0:
            continue
        x = xs[starts[s] : starts[s] + n]
        for g0 in range(0, grid.shape[0], 64):
            g = grid[g0 : g0 + 64, None]
            z = (g - x[None, :]) / bw
            k = np.where(np.abs(z) <= cutoff, np.exp(-0.5 * z * z), 0.0)
            out[s, g0 : g0 + 64] = k.sum(1) / (n * bw * _SQRT2PI)


class ExactKDE:
    """Scott-bandwidth Gaussian KDE of exact samples, one sample set per row of the result.

    Args:
        grid: evaluation points.
        cutoff: samples further than ``cutoff`` bandwidths from a grid point are skipped.
        use_numba: None = use Numba when installed.
    """

    def __init__(self, grid: np.ndarray, cutoff: float = 12.0, use_numba: bool | None = None) -> None:
        self.grid = np.ascontiguousarray(grid, dtype=np.float64)
        self.cutoff = float(cutoff)
        self.use_numba = HAS_NUMBA if use_numba is None else use_numba
        if self.use_numba and not HAS_NUMBA:
            raise RuntimeError("use_numba=True but numba is not installed")
        self.bandwidths: np.ndarray | None = None

    def __call__(self, samples: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Density [n_sets, points] for each 1-D sample set in ``samples``."""
        sets = [np.sort(np.asarray(s, dtype=np.float64).ravel()) for s in samples]
        counts = np.array([s.size for s in sets], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        bws = np.zeros(len(sets))
        spacing = (self.grid[-1] - self.grid[0]) / max(len(self.grid) - 1, 1) or 1.0
        empty, flat = [], []
        for i, s in enumerate(sets):
            var = float(np.var(s, ddof=1)) if s.size > 1 else 0.0
            if s.size == 0:
                empty.append(i)
            elif var <= 0.0:
                flat.append(i)
                bws[i] = spacing
            else:
                bws[i] = scott_bandwidth(s.size, var)
        if empty:
            warnings.warn(f"KDE: no samples in set(s) {_rows(empty)}, density set to 0", KDEWarning, stacklevel=2)
        if flat:
            warnings.warn(
                f"KDE: samples without spread in set(s) {_rows(flat)}, bandwidth set to the grid spacing",
                KDEWarning,
                stacklevel=2,
            )
        self.bandwidths = bws
        xs = np.concatenate(sets) if sets else np.zeros(0)
        out = np.zeros((len(sets), self.grid.size))
        fn = _window_sum_nb if self.use_numba else _window_sum_np
        fn(xs, starts, counts, self.grid, bws, self.cutoff, out)
        return out


class BinnedKDE:
    """Scott-bandwidth Gaussian KDE from a histogram on [0, 1] and the exact moments of the samples.

    Args:
        grid: evaluation points.
        min_bins_per_bw: warn when the bandwidth is narrower than this many bins.
    """

    def __init__(self, grid: np.ndarray, min_bins_per_bw: float = 3.0) -> None:
        self.grid = np.asarray(grid, dtype=np.float64)
        self.min_bins_per_bw = min_bins_per_bw
        self.bandwidths: np.ndarray | None = None
        self.error_bounds: np.ndarray | None = None  # absolute bound on the density error, per row

    def __call__(self, hist: np.ndarray, moments: np.ndarray) -> np.ndarray:
        """Density [rows, points] from ``hist`` [rows, bins] and ``moments`` [rows, 3] = (n, sum, sum of squares)."""
        hist = np.atleast_2d(np.asarray(hist, dtype=np.float64))
        moments = np.atleast_2d(np.asarray(moments, dtype=np.float64))
        rows, bins = hist.shape
        h = 1.0 / bins
        centres = (np.arange(bins) + 0.5) * h
        out = np.zeros((rows, self.grid.size))
        self.bandwidths = np.zeros(rows)
        self.error_bounds = np.zeros(rows)
        few, narrow = [], []
        for r in range(rows):
            n, s1, s2 = moments[r]
            if n < 2:
                few.append(r)
                continue
            var = max((s2 - s1 * s1 / n) / (n - 1), 0.0)
            bw = scott_bandwidth(n, var) if var > 0 else h
            if bw < self.min_bins_per_bw * h:
                narrow.append(r)
            nz = np.nonzero(hist[r])[0]
            z = (self.grid[:, None] - centres[None, nz]) / bw  # [points, nonzero bins]
            out[r] = (np.exp(-0.5 * z * z) @ hist[r, nz]) / (n * bw * _SQRT2PI)
            self.bandwidths[r] = bw
            self.error_bounds[r] = h / (2.0 * bw * bw * math.sqrt(2.0 * math.pi * math.e))
        if few:
            msg = f"binned KDE: fewer than 2 samples in row(s) {_rows(few)}, density set to 0"
            warnings.warn(msg, KDEWarning, stacklevel=2)
        if narrow:
            low = float(self.bandwidths[narrow].min())
            warnings.warn(
                f"binned KDE: bandwidth under {self.min_bins_per_bw:g} bins ({h:.3g} each) in row(s) {_rows(narrow)} "
                f"(down to {low:.3g}); the log10 histogram is the honest view of these weights",
                KDEWarning,
                stacklevel=2,
            )
        return out
