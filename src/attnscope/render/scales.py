"""Colour scales that show structure in heavy-tailed statistics, and say on the figure what they clip.

Attention weights, KDE densities and activation norms span many decades (a sink token takes most of a row, a
KDE peaks at ~1000 near p = 0), so a linear colour scale paints nearly everything one colour. The helpers here
return a matplotlib norm together with the words for the colourbar label, so a figure never hides what it
clipped.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Scale", "log_scale", "robust_range", "symmetric_scale"]


class Scale:
    """A colour normalisation and the text that describes it (for the colourbar label)."""

    def __init__(self, vmin: float, vmax: float, log: bool, note: str, clipped: float = 0.0):
        self.vmin, self.vmax, self.log, self.note, self.clipped = float(vmin), float(vmax), log, note, clipped

    def norm(self):
        from matplotlib.colors import LogNorm, Normalize

        return LogNorm(self.vmin, self.vmax) if self.log else Normalize(self.vmin, self.vmax)

    def label(self, what: str) -> str:
        """``what`` and the scale's note, on two lines when they would not fit a colourbar's height."""
        text = f"{what}{self.note}"
        if len(text) > 48 and "(" in self.note:
            head, _, rest = self.note.partition("(")
            return f"{what}{head.rstrip()}\n({rest}"
        return text


def _fmt(x: float) -> str:
    return f"{x:.2g}"


def log_scale(values, decades: float = 4.0, floor: float | None = None, floor_what: str = "") -> Scale:
    """Log colour from the largest value down ``decades`` decades (or down to ``floor``, e.g. one sample's share).

    Values under the floor (zeros too) are drawn in the floor's colour; the label says so, and how many.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    pos = v[v > 0]
    vmax = float(pos.max()) if pos.size else 1.0
    lo = vmax * 10.0**-decades if floor is None else min(float(floor), vmax / 10)
    if pos.size and pos.min() > lo:  # nothing to clip: start at the smallest value
        lo = float(pos.min())
    under = float(np.mean(v < lo)) if v.size else 0.0
    share = f"{under:.0%}" if under >= 0.005 else f"{under:.1%}"
    what = f" ({floor_what})" if floor_what else ""
    note = f" (log colour; {share} of cells under {_fmt(lo)}{what} at the floor)" if under > 0 else " (log colour)"
    return Scale(lo, vmax, True, note, under)


def robust_range(values, q: float = 99.5) -> tuple[float, float, float]:
    """``(lo, hi, clipped fraction)``: the ``100 - q`` and ``q`` percentiles, or min and max when nothing is far out."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0, 0.0
    lo, hi = np.percentile(v, [100 - q, q])
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max()) or 1.0
    clipped = float(np.mean((v < lo) | (v > hi)))
    return float(lo), float(hi), clipped


def symmetric_scale(values, q: float = 99.0) -> Scale:
    """A diverging scale symmetric about 0, its limit the ``q`` percentile of |values| (robust to outliers)."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    a = a[np.isfinite(a)]
    if a.size == 0 or a.max() == 0:
        return Scale(-1.0, 1.0, False, " (all zero)")
    lim = float(np.percentile(a, q))
    if lim <= 0:
        lim = float(a.max())
    over = float(np.mean(a > lim))
    if over > 0:
        note = f" (clipped at ±{_fmt(lim)}: {over:.1%} of cells beyond, largest {_fmt(a.max())})"
    else:
        note = ""
    return Scale(-lim, lim, False, note, over)
