"""Laminar profiles as heatmaps: X layer, Y attention weight, colour the density of weights in that layer.

Kinds ``self``, ``final`` and ``all`` are Gaussian KDEs on [0, 1]; ``log`` is the histogram of log10 p over every
causal pair (``attn.hist_log``), the view that still resolves the many weights near 0 that a KDE on [0, 1] piles
into one band. The colour scale is logarithmic by default (the density near p = 0 is ~1000x the rest), or
normalised per layer, or linear; the colourbar label says which, and what it draws at the floor.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from attnscope.kernels.stats import HIST_LOG, LAMINAR

from .base import Renderer, floor_cmap
from .scales import Scale, log_scale

__all__ = ["LAMINAR_KINDS", "LAMINAR_SCALES", "LaminarRenderer", "laminar_data", "laminar_scale", "render_laminar"]

LAMINAR_KINDS = {kind: lam.label for kind, lam in LAMINAR.items()}  # kind -> what it draws
LAMINAR_SCALES = ("log", "layer", "linear")
LOG_ROWS = 240  # rows of the log10 view (the histogram's bins are summed into these)


def _one_sample(prof, kind: str, head: int | None) -> float:
    """A tenth of the smallest density one sample alone gives at its own position, over the layers:
    0.1 / (n bw sqrt(2 pi)) with Scott's bandwidth. Under it a KDE shows only the far tails of kernels."""
    heads = slice(None) if head is None else slice(head, head + 1)
    w = None if kind == "all" else prof.weights(kind)
    if w is None:  # from the exact moments (a corpus run keeps them for every kind)
        mom = prof.arrays[LAMINAR[kind].moments][:, heads].sum(1)  # [Ly, 3]
        n, s1, s2 = mom[:, 0], mom[:, 1], mom[:, 2]
        var = np.maximum((s2 - s1 * s1 / np.maximum(n, 1)) / np.maximum(n - 1, 1), 0.0)
    else:
        x = w[:, heads]
        x = x.reshape(x.shape[0], -1).astype(np.float64)  # [Ly, samples]
        n, var = np.full(x.shape[0], x.shape[1], dtype=np.float64), x.var(1, ddof=1) if x.shape[1] > 1 else 0 * x[:, 0]
    bw = np.sqrt(var) * np.maximum(n, 1) ** -0.2
    ok = (n > 1) & (bw > 0)
    # a tenth of it, so that a lone sample shows one step above the floor instead of vanishing into it
    return float((0.1 / (n[ok] * bw[ok] * math.sqrt(2 * math.pi))).min()) if ok.any() else 0.0


_CUTS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _largest_weight(prof, kind: str) -> float:
    """The largest weight of a kind over every layer and head (exact from the weights; from a histogram, the top
    occupied bin's edge)."""
    w = None if kind == "all" else prof.weights(kind)
    if w is None:
        hist = prof.arrays[LAMINAR[kind].hist].sum((0, 1))  # [bins]
        nz = np.nonzero(hist)[0]
        return float((nz[-1] + 1) / hist.size) if nz.size else 1.0
    return float(w.max()) if w.size else 1.0


def laminar_data(prof, kind: str, points: int = 300, head: int | None = None, also=()):
    """``(y, values [layers, len(y)], what, ylabel, y_note, floor)`` of one laminar kind.

    ``self``/``final``/``all``: the KDE density on a ``points`` grid from 0 up to the smallest of 0.02, 0.05, 0.1,
    0.2, 0.3, 0.5, 0.7, 1 that clears the largest weight (of any head, so per-head panels share it); ``floor`` a
    tenth of one sample's density (smaller values are the far tails of kernels centred elsewhere). ``log``: per
    layer, the fraction of causal pairs in each log10 p bin (the 4096 bins summed into ``LOG_ROWS`` rows), from the
    lowest occupied decade to 0, ``floor`` a tenth of one pair's share; its lowest row also holds the weights under
    the histogram's range (and exact zeros). ``y_note`` says where the axis was cut. The axis covers the
    profiles in ``also`` too (to draw several on one axis).
    """
    if LAMINAR[kind].kde:
        top = max(_largest_weight(p, kind) for p in (prof, *also))
        hi = next((c for c in _CUTS if c >= 1.1 * top), 1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grid, dens = prof.laminar(kind, points=points, head=head, hi=hi)
        who = "" if head is None else f", head {head}"
        for m in sorted({str(w.message) for w in caught}):  # the KDE's rows are layers here
            warnings.warn(f"laminar {kind}{who}: {m.replace('row(s)', 'layer(s)')}", UserWarning, stacklevel=2)
        note = f"axis cut at {hi:g}: no weight above {top:.3g}" if hi < 1.0 else ""
        return grid, dens, "density", "attention weight", note, _one_sample(prof, kind, head)
    if kind != "log":
        raise ValueError(f"unknown laminar kind {kind!r}: choose from {', '.join(LAMINAR_KINDS)}")
    if head is not None and not 0 <= head < prof.n_heads:
        raise IndexError(f"head {head} out of range: the model has {prof.n_heads} heads")
    full = prof.arrays[HIST_LOG.key]  # [Ly, H, bins]
    hist = full.sum(1) if head is None else full[:, head]  # [Ly, bins]
    bins = hist.shape[-1]
    log_min = float((prof.meta.get("spec") or {}).get("log_min", -12.0))
    rows = min(LOG_ROWS, bins)
    edges = np.linspace(0, bins, rows + 1).round().astype(int)
    coarse = np.add.reduceat(hist.astype(np.float64), edges[:-1], axis=1)  # [Ly, rows]
    total = coarse.sum(1, keepdims=True)
    frac = np.divide(coarse, total, out=np.zeros_like(coarse), where=total > 0)
    y = log_min + (edges[:-1] + edges[1:]) / 2 * (-log_min / bins)
    note = f"lowest row: p < {10**log_min:.0e} too" if coarse[:, 0].any() else ""
    # over every head, so per-head panels share the axis (and over the profiles in ``also``)
    occupied = np.nonzero(sum(p.arrays[HIST_LOG.key].sum((0, 1)) for p in (prof, *also)))[0]
    if occupied.size:
        lowest = log_min + occupied[0] * (-log_min / bins)  # lower edge of the lowest occupied bin
        cut = max(log_min, np.floor(lowest) - 1.0)
        if cut > log_min:
            keep = y >= cut
            y, frac = y[keep], frac[:, keep]
            note = f"axis cut at 1e{cut:.0f}: no weight under {10**lowest:.2g}"
    one = float((0.1 / total[total > 0]).min()) if (total > 0).any() else 0.0  # a tenth of one pair's share
    return y, frac, "fraction of pairs", "log10 attention weight", note, one


def laminar_scale(values: np.ndarray, scale: str = "log", floor: float | None = None) -> tuple[np.ndarray, Scale]:
    """The image to draw and its colour scale: ``log`` (down to ``floor``, a tenth of one sample's share, else 4
    decades under the maximum), ``layer`` (each layer divided by its own maximum, linear) or ``linear``."""
    values = np.asarray(values, dtype=np.float64)
    if scale == "log":
        if floor:
            return values, log_scale(values, floor=floor, floor_what="a tenth of one sample's share")
        return values, log_scale(values, decades=4.0)
    if scale == "layer":
        peak = values.max(axis=-1, keepdims=True)
        img = np.divide(values, peak, out=np.zeros_like(values), where=peak > 0)
        return img, Scale(0.0, 1.0, False, " / its layer's maximum (per-layer normalisation)")
    if scale == "linear":
        return values, Scale(0.0, float(values.max()) or 1.0, False, " (linear colour)")
    raise ValueError(f"scale must be one of {', '.join(LAMINAR_SCALES)}, got {scale!r}")


def _draw(ax, y: np.ndarray, img: np.ndarray, scale: Scale, cmap: str, title: str, ylabel: str):
    n_layers = img.shape[0]
    dy = (y[-1] - y[0]) / max(len(y) - 1, 1)
    im = ax.imshow(
        img.T,  # [points, layers]
        origin="lower",
        aspect="auto",
        extent=(-0.5, n_layers - 0.5, y[0] - dy / 2, y[-1] + dy / 2),
        cmap=floor_cmap(cmap),
        norm=scale.norm(),
        interpolation="nearest",
    )
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return im


def _kde_notes(caught, kind: str, heads: int | None = None) -> str:
    """Pass the KDE's warnings on as one warning per figure (rows of a laminar KDE are layers); the figure's note."""
    msgs = sorted({str(w.message) for w in caught})
    if not msgs:
        return ""
    if heads is None:
        for m in msgs:
            warnings.warn(m, UserWarning, stacklevel=3)
    else:
        warnings.warn(
            f"laminar {kind}, per head: the KDE bandwidth is under 3 histogram bins in some layers of {len(msgs)} "
            f"of {heads} heads; the log10 histogram (kind 'log') is the honest view of these weights",
            UserWarning,
            stacklevel=3,
        )
    return "KDE: bandwidth under 3 histogram bins in some layers; the 'log' kind is the honest view"


class LaminarRenderer(Renderer):
    """One PNG (or PDF) per kind of weights, all layers; optionally one grid of per-head panels per kind.

    Args:
        kinds: any of ``"self"``, ``"final"``, ``"all"``, ``"log"``.
        points: KDE grid size on [0, 1].
        per_head: also draw a figure per kind with one panel per head (one colour scale for all heads).
        fmt: ``"png"`` or ``"pdf"``.
        cmap: matplotlib colour map.
        scale: ``"log"`` colour (default), ``"layer"`` (each layer normalised to its maximum) or ``"linear"``.
    """

    def __init__(
        self,
        kinds=tuple(LAMINAR),
        points: int = 300,
        per_head: bool = False,
        fmt: str = "png",
        cmap: str = "magma",
        dpi: int = 120,
        scale: str = "log",
    ):
        unknown = [k for k in kinds if k not in LAMINAR_KINDS]
        if unknown:
            raise ValueError(f"unknown laminar kind(s) {unknown}: choose from {', '.join(LAMINAR_KINDS)}")
        if not kinds:
            raise ValueError(f"no laminar kind given: choose from {', '.join(LAMINAR_KINDS)}")
        if fmt not in ("png", "pdf"):
            raise ValueError(f"fmt must be png or pdf, got {fmt!r}")
        if scale not in LAMINAR_SCALES:
            raise ValueError(f"scale must be one of {', '.join(LAMINAR_SCALES)}, got {scale!r}")
        if points < 2:
            raise ValueError(f"points must be at least 2, got {points}")
        self.kinds, self.points, self.per_head, self.cmap, self.dpi = tuple(kinds), points, per_head, cmap, dpi
        self.scale = scale
        self.output_file_extension = fmt

    def _figure(self, profile, kind: str):
        import matplotlib.pyplot as plt

        model = profile.meta.get("model_id", "model")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, values, what, ylabel, y_note, floor = laminar_data(profile, kind, self.points)
        note = _kde_notes(caught, kind)
        img, scale = laminar_scale(values, self.scale, floor)
        fig, ax = plt.subplots(figsize=(max(5.5, 0.22 * profile.n_layers + 2.5), 4.4), layout="constrained")
        title = (
            f"{model}: {LAMINAR_KINDS[kind]}\n{len(profile.prompts)} prompt(s), {profile.n_tokens} tokens, "
            "all heads pooled"
        )
        im = _draw(ax, y, img, scale, self.cmap, title, ylabel)
        fig.colorbar(im, ax=ax).set_label(scale.label(what), fontsize=8)
        footer = "; ".join(n for n in (y_note, note) if n)
        if footer:
            ax.text(0.0, -0.13, footer, transform=ax.transAxes, fontsize=7, va="top", color="0.3")
        return fig

    def _heads_figure(self, profile, kind: str):
        import matplotlib.pyplot as plt

        model = profile.meta.get("model_id", "model")
        H = profile.n_heads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = [laminar_data(profile, kind, self.points, head=h) for h in range(H)]
        note = _kde_notes(caught, kind, H)
        y, _, what, ylabel, _, _ = data[0]
        stack = np.stack([d[1] for d in data])  # [H, layers, len(y)]
        floor = min((d[5] for d in data if d[5] > 0), default=None)
        if self.scale == "layer":
            imgs = [laminar_scale(v, "layer")[0] for v in stack]
            scale = laminar_scale(stack[0], "layer")[1]
        else:
            imgs, scale = list(stack), laminar_scale(stack, self.scale, floor)[1]  # one scale for every head
        cols = min(H, max(3, math.ceil(math.sqrt(H))))
        rows = -(-H // cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(2.9 * cols + 1.2, 2.4 * rows + 0.8), squeeze=False, layout="constrained"
        )
        im = None
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= H:
                ax.axis("off")
                continue
            im = _draw(ax, y, imgs[h], scale, self.cmap, f"head {h}", ylabel if h % cols == 0 else "")
            if h // cols != rows - 1:
                ax.set_xlabel("")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8).set_label(scale.label(what), fontsize=8)
        fig.suptitle(f"{model}: {LAMINAR_KINDS[kind]}, per head" + (f"\n{note}" if note else ""), fontsize=10)
        return fig

    def render(self, profile, out_dir) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for kind in self.kinds:
            figs = [(self._figure(profile, kind), f"laminar_{kind}")]
            if self.per_head:
                figs.append((self._heads_figure(profile, kind), f"laminar_{kind}_heads"))
            for fig, stem in figs:
                path = out_dir / f"{stem}.{self.output_file_extension}"
                fig.savefig(path, dpi=self.dpi)
                plt.close(fig)
                written.append(path)
        return written


def render_laminar(profile, out_dir, **kwargs) -> list[Path]:
    """Shorthand for ``LaminarRenderer(**kwargs).render(profile, out_dir)``."""
    return LaminarRenderer(**kwargs).render(profile, out_dir)
