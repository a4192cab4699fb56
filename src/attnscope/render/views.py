"""Matplotlib views of a saved profile: attention heatmaps, attention patterns, the layer grid, down_proj
norms and the comparison of two profiles. Each function returns the figure; ``save`` writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnscope.kernels.stats import DIST, ENTROPY, LAMINAR, PREV, SINK, THUMB_REL, THUMB_REL_COUNT

from .base import floor_cmap, pyplot
from .scales import Scale, log_scale, symmetric_scale
from .summary import (
    HEAD_COLUMNS,
    ViewError,
    attention_matrix,
    check_layer_head,
    down_proj_by_position,
    head_summary,
    high_entropy_positions,
    received,
    token_labels,
)

__all__ = [
    "plot_compare",
    "plot_down_proj",
    "plot_heatmaps",
    "plot_layer_grid",
    "plot_layer_grid_relative",
    "plot_patterns",
    "save",
]

MAX_LABELS = 48  # token labels per axis before thinning
MATRIX_CMAP = "viridis"
MAX_TOKEN_ROWS = 1000  # the down_proj heatmap draws at most this many rows (max over blocks of tokens past it)


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _token_text(t: str, width: int = 12) -> str:
    text = repr(t)[1:-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def _label_ticks(ax, labels: list[str], axis: str, max_labels: int = MAX_LABELS, fontsize: float = 6) -> None:
    """Token text on an axis in token positions; when there are too many to read, every k-th one with its position."""
    n = len(labels)
    step = max(1, int(np.ceil(n / max_labels)))
    pos = np.arange(0, n, step)
    if step == 1:
        text = [_token_text(labels[i]) for i in pos]
    else:
        text = [f"{i} {_token_text(labels[i], 10)}" for i in pos]
    if axis == "x":
        ax.set_xticks(pos, text, rotation=90, fontsize=fontsize)
    else:
        ax.set_yticks(pos, text, fontsize=fontsize)


def _crosshairs(ax, positions) -> None:
    for p in positions:
        ax.axhline(p, color="yellow", lw=0.8, alpha=0.9)
        ax.axvline(p, color="yellow", lw=0.8, alpha=0.9)


def _cmap(name: str, bad: str = "0.88"):
    import matplotlib

    cm = matplotlib.colormaps[name]
    return cm.with_extremes(bad=bad, under=cm(0.0))


def _causal_only(m: np.ndarray) -> np.ndarray:
    """NaN (drawn light grey) where no causal pair exists: above the diagonal, in token or thumbnail cells."""
    r, c = np.indices(m.shape)
    out = m.astype(np.float64, copy=True)
    out[(c > r) & (m == 0)] = np.nan
    return out


MAX_CELLS = 512  # a full matrix longer than this is drawn averaged over k x k cells (a screen has no more pixels)


def _pool(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Average-pool a square matrix over k x k cells so that it has at most ``MAX_CELLS`` rows; ``(pooled, k)``."""
    L = m.shape[0]
    k = -(-L // MAX_CELLS)
    if k == 1:
        return m, 1
    n = -(-L // k)
    pad = np.zeros((n * k, n * k), dtype=np.float64)
    pad[:L, :L] = m
    return pad.reshape(n, k, n, k).mean((1, 3)), k


def matrix_scale(mats, scale: str = "log") -> Scale:
    """One colour scale for attention matrices: log colour from the largest weight down to the 5th percentile of
    the positive weights (at most 8 decades, at least 2), or linear."""
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in mats])
    values = values[np.isfinite(values)]
    if scale == "log":
        pos = values[values > 0]
        top = float(pos.max()) if pos.size else 1.0
        floor = float(np.clip(np.percentile(pos, 5), top * 1e-8, top * 1e-2)) if pos.size else top * 1e-4
        return log_scale(values, floor=floor)
    if scale == "linear":
        return Scale(0.0, float(values.max()) if values.size else 1.0, False, " (linear colour)")
    raise ValueError(f"scale must be log or linear, got {scale!r}")


def _draw_matrix(ax, m: np.ndarray, length: int, cmap: str, norm):
    # the matrix (full L x L or pooled R x R) is drawn over token positions, so labels and marks line up
    return ax.imshow(
        m,
        cmap=_cmap(cmap),
        norm=norm,
        interpolation="nearest",
        aspect="auto",
        extent=(-0.5, length - 0.5, length - 0.5, -0.5),
    )


def _check_mark_top(mark_top: int) -> None:
    if mark_top < 0:
        raise ViewError(f"--mark-top takes a count of tokens (0 for none), got {mark_top}")


def plot_heatmaps(prof, pairs, prompt: int = 0, mark_top: int = 5, cmap: str = MATRIX_CMAP, scale: str = "log"):
    """2-D heatmaps (query on Y, key on X) of the given (layer, head) pairs of one prompt.

    A head's kept full matrix is drawn when there is one, else its pooled thumbnail; the ``mark_top``
    positions of highest next-token entropy get yellow cross-hairs. ``scale``: ``"log"`` colour (default; the
    first token often takes most of each row) or ``"linear"``; each panel has its own colourbar.
    """
    plt = pyplot()
    _check_mark_top(mark_top)
    if not pairs:
        raise ViewError("no heads given: name them as LAYER:HEAD, e.g. 0:0,14:0")
    for layer, head in pairs:
        check_layer_head(prof, layer, head)
    labels = token_labels(prof, prompt)
    marks = high_entropy_positions(prof, prompt, mark_top) if mark_top else []
    n = len(pairs)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 5.4 * rows), squeeze=False, layout="constrained")
    for i, (layer, head) in enumerate(pairs):
        ax = axes[i // cols][i % cols]
        m, full, L = attention_matrix(prof, prompt, layer, head)
        k = 1
        if full:
            m, k = _pool(m)
        m = _causal_only(m)
        sc = matrix_scale([m], scale)
        im = _draw_matrix(ax, m, m.shape[0] * k if k > 1 else L, cmap, sc.norm())
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(L - 0.5, -0.5)
        _crosshairs(ax, marks)
        _label_ticks(ax, labels, "x", max_labels=32)
        _label_ticks(ax, labels, "y")
        kind = "full matrix" if full else f"pooled {m.shape[0]}x{m.shape[1]} thumbnail"
        if k > 1:
            kind = f"full matrix, shown averaged over {k}x{k} cells"
        ax.set_title(f"layer {layer} head {head} ({kind})", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(im, ax=ax, fraction=0.05).set_label(sc.label("attention weight"), fontsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(
        f"{prof.meta.get('model_id')}: attention, prompt {prompt} ({len(labels)} tokens); grey: no causal pair"
        + ("; yellow: highest next-token entropy" if len(marks) else ""),
        fontsize=10,
    )
    return fig


def plot_patterns(prof, pairs, prompt: int = 0, mode: str = "mean", token: int | None = None, scale: str = "log"):
    """1-D bar charts per (layer, head): attention received per key ('mean' or 'max'), or one token's row.

    ``scale``: ``"log"`` y axis (default; the first token often takes most of the weight) or ``"linear"``.
    """
    plt = pyplot()
    if scale not in ("log", "linear"):
        raise ValueError(f"scale must be log or linear, got {scale!r}")
    if not pairs:
        raise ViewError("no heads given: name them as LAYER:HEAD, e.g. 0:0,14:0")
    labels = token_labels(prof, prompt)
    series = [received(prof, prompt, layer, head, mode, token) for layer, head in pairs]
    L = len(labels)
    fits = L <= 120  # one readable label per bar
    fig, axes = plt.subplots(
        len(pairs), 1, figsize=(11.0, 2.3 * len(pairs) + (1.0 if fits else 0.6)), squeeze=False, layout="constrained"
    )
    what = {"mean": "mean attention received", "max": "max attention received"}.get(
        mode, f"attention of token {L - 1 if token is None else token}"
    )
    for ax, (layer, head), y in zip(axes[:, 0], pairs, series):
        y = np.asarray(y, dtype=np.float64)
        x = np.arange(L)
        ylabel = "weight"
        if scale == "log":
            pos = y[y > 0]
            top = float(pos.max()) if pos.size else 1.0
            floor = max(float(pos.min()) if pos.size else top * 1e-4, top * 1e-5)
            under = int(np.sum(y < floor))
            ax.set_yscale("log")
            ax.set_ylim(floor / 1.5, top * 1.5)
            ylabel = "weight (log)" + (f"\n{under} under {floor:.1g} not drawn" if under else "")
            base = floor / 1.5
        else:
            base = 0.0
        if L <= 400:
            ax.bar(x, y - base, bottom=base, width=0.9, color="tab:blue")
        else:  # too many bars for one pixel each: a filled step curve
            ax.fill_between(x, base, np.maximum(y, base), step="mid", color="tab:blue", lw=0)
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"layer {layer} head {head}: {what}", fontsize=9)
        _label_ticks(ax, labels, "x", max_labels=120 if fits else 60, fontsize=6 if L <= 80 else 5)
    fig.suptitle(f"{prof.meta.get('model_id')}: prompt {prompt} ({L} tokens)", fontsize=10)
    return fig


def _sink_row(prof, prompt: int, layer: int, head: int | None, length: int) -> np.ndarray | None:
    """Each query's exact attention to the first token, p(i, 0), heads averaged or one head: [L], or None for a run
    without the per-token vectors. A pooled cell averages the first key with its neighbours, so a strong sink
    would otherwise look faint."""
    try:
        sink = np.asarray(prof.arrays[SINK.key][layer, :, prof.prompt_slice(prompt)])  # [H, L]
    except (KeyError, ValueError, TypeError, IndexError):
        return None
    if sink.ndim != 2 or sink.shape[1] != length:
        return None
    return sink.mean(0) if head is None else sink[head]


def _sink_strip(ax, row: np.ndarray, cmap, norm) -> None:
    """The sink row as a strip right of a panel, on the panel's colour scale."""
    cax = ax.inset_axes([1.015, 0.0, 0.045, 1.0])
    n = row.shape[0]
    cax.imshow(
        row[:, None], aspect="auto", cmap=_cmap(cmap), norm=norm, interpolation="nearest",
        extent=(-0.5, 0.5, n - 0.5, -0.5),
    )  # fmt: skip
    cax.set_xticks([0], [SINK.name], fontsize=5, rotation=90)
    cax.set_yticks([])


def plot_layer_grid(
    prof, layers, head: int | None = None, prompt: int = 0, mark_top: int = 5, cmap: str = "RdBu_r", scale: str = "log"
):
    """Paper-style grid of the chosen layers (heads averaged, or one head) on ONE shared colour scale (log by
    default, or linear)."""
    plt = pyplot()
    _check_mark_top(mark_top)
    if not layers:
        raise ViewError("no layers given")
    for layer in layers:
        check_layer_head(prof, layer, head)
    labels = token_labels(prof, prompt)
    mats = []
    for la in layers:
        m, full, L = attention_matrix(prof, prompt, la, head)
        k = _pool(m)[1] if full else 1  # a long full matrix: averaged over k x k cells, like the heatmap
        mats.append((_causal_only(_pool(m)[0] if k > 1 else m), k, L))
    sinks = [_sink_row(prof, prompt, la, head, L) for la, (_, _, L) in zip(layers, mats)]
    sc = matrix_scale([m for m, _, _ in mats] + [r for r in sinks if r is not None], scale)
    marks = high_entropy_positions(prof, prompt, mark_top) if mark_top else []
    cols = min(len(layers), 4)
    rows = -(-len(layers) // cols)
    L = len(labels)
    per = 3.6 if L > 40 else 4.2
    fig, axes = plt.subplots(
        rows, cols, figsize=(per * cols + 1.2, per * rows + 0.6), squeeze=False, layout="constrained"
    )
    im = None
    n_labels = 24 if L > 40 else 40
    for i, (layer, (m, k, L)) in enumerate(zip(layers, mats)):
        ax = axes[i // cols][i % cols]
        im = _draw_matrix(ax, m, m.shape[0] * k if k > 1 else L, cmap, sc.norm())
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(L - 0.5, -0.5)
        _crosshairs(ax, marks)
        if sinks[i] is not None:
            _sink_strip(ax, sinks[i], cmap, sc.norm())
        ax.set_title(f"layer {layer}", fontsize=9)
        _label_ticks(ax, labels, "x", max_labels=n_labels, fontsize=5)
        _label_ticks(ax, labels, "y", max_labels=n_labels, fontsize=5)
        if i % cols:
            ax.set_yticklabels([])
    who = "heads averaged" if head is None else f"head {head}"
    title = f"layer grid ({who}), prompt {prompt}, one colour scale; grey: no causal pair; strip: each query's exact "
    return _finish_grid(fig, axes, len(layers), im, sc, prof, title + "attention to the first token")


def _finish_grid(fig, axes, n_panels: int, im, sc, prof, title: str):
    """Blank the unused panels, add the shared colourbar and the title of a layer grid."""
    for ax in axes.ravel()[n_panels:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7).set_label(sc.label("attention weight"), fontsize=8)
    fig.suptitle(f"{prof.meta.get('model_id')}: {title}", fontsize=10)
    return fig


def plot_layer_grid_relative(prof, layers, head: int | None = None, cmap: str = "RdBu_r", scale: str = "log"):
    """The layer grid of a whole run in relative position: each layer's thumbnail averaged over every prompt that
    has a cell there (``attn.thumb_rel`` / ``attn.thumb_rel_count``), for runs that keep no per-prompt thumbnail.
    One colour scale; grey where no prompt has a causal pair."""
    plt = pyplot()
    if not layers:
        raise ViewError("no layers given")
    for layer in layers:
        check_layer_head(prof, layer, head)
    count = np.asarray(prof.arrays[THUMB_REL_COUNT.key], dtype=np.float64)  # [R, R]
    rel = np.asarray(prof.arrays[THUMB_REL.key])  # [Ly, H, R, R] sums over prompts
    mats = []
    for la in layers:
        s = rel[la].mean(0) if head is None else rel[la, head]
        m = np.divide(s, count, out=np.zeros_like(s, dtype=np.float64), where=count > 0)
        m = _causal_only(m)
        m[count == 0] = np.nan
        mats.append(m)
    sc = matrix_scale(mats, scale)
    cols = min(len(layers), 4)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 3.6 * rows + 0.6), squeeze=False)
    fig.set_layout_engine("constrained")
    im = None
    for i, (layer, m) in enumerate(zip(layers, mats)):
        ax = axes[i // cols][i % cols]
        im = ax.imshow(m, cmap=_cmap(cmap), norm=sc.norm(), interpolation="nearest", extent=(0, 1, 1, 0))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("key (relative position)", fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("query (relative position)", fontsize=7)
        ax.tick_params(labelsize=6)
    who = "heads averaged" if head is None else f"head {head}"
    title = f"layer grid ({who}), mean over {len(prof.prompts)} prompts in relative position; grey: no causal pair"
    return _finish_grid(fig, axes, len(layers), im, sc, prof, title)


def plot_down_proj(prof, prompt: int = 0, mark_top: int = 5, scale: str = "log"):
    """Token x layer heatmaps of the down_proj input (neuron activations) and output L2 norms, log colour by
    default (the first tokens' norms are often 100x the rest), or linear."""
    plt = pyplot()
    _check_mark_top(mark_top)
    sl = prof.prompt_slice(prompt)
    labels = token_labels(prof, prompt)
    L = len(labels)
    fig, axes = plt.subplots(
        1, 2, figsize=(12, min(16.0, max(4.5, 0.11 * min(L, 120) + 2.5))), squeeze=False, layout="constrained"
    )
    marks = high_entropy_positions(prof, prompt, mark_top) if mark_top else []
    for ax, name, title in zip(axes[0], ("mlp.in_norm", "mlp.out_norm"), ("down_proj input", "MLP block output")):
        m = np.asarray(prof.arrays[name][:, sl], dtype=np.float64).T  # [tokens, layers]
        k = -(-L // MAX_TOKEN_ROWS)
        if k > 1:  # more tokens than pixel rows: the max of each k tokens, so no outlier drops out of the picture
            pad = np.full((-(-L // k) * k, m.shape[1]), -np.inf)
            pad[:L] = m
            m = pad.reshape(-1, k, m.shape[1]).max(1)
        if scale == "log":
            sc = log_scale(m, decades=6.0)
        elif scale == "linear":
            sc = Scale(0.0, float(np.nanmax(m, initial=0.0)) or 1.0, False, " (linear colour)")
        else:
            raise ValueError(f"scale must be log or linear, got {scale!r}")
        im = ax.imshow(
            m,
            aspect="auto",
            cmap=_cmap("magma"),
            norm=sc.norm(),
            interpolation="nearest",
            extent=(-0.5, m.shape[1] - 0.5, m.shape[0] * k - 0.5, -0.5),
        )
        ax.set_ylim(L - 0.5, -0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("token" if k == 1 else f"token (each row: the max over {k} tokens)")
        moe = np.isnan(m).all(0)  # mixture-of-experts layers: no down_proj input (blank)
        note = f"; blank: MoE layers {', '.join(map(str, np.flatnonzero(moe)))}" if moe.any() and m.size else ""
        ax.set_title(f"{title} L2 norm{note}", fontsize=9)
        _label_ticks(ax, labels, "y", max_labels=60)
        for p in marks:
            ax.axhline(p, color="yellow", lw=0.8)
        fig.colorbar(im, ax=ax, fraction=0.05).set_label(sc.label("L2 norm"), fontsize=8)
    fig.suptitle(
        f"{prof.meta.get('model_id')}: down_proj norms, prompt {prompt} ({L} tokens)"
        + ("; yellow: highest next-token entropy" if len(marks) else ""),
        fontsize=10,
    )
    return fig


def _triple(
    fig, row, ma, mb, names, what, cmap, ylabel, extent=None, log=False, diff_what="B - A", floor=None, shared=True
):
    """A and B on one colour scale (log when ``log``; each its own when not ``shared``) and B - A on a diverging
    scale, symmetric about 0 and robust (the 99th percentile of |B - A|; the label says what it clips), as
    [layers, y] heatmaps.

    With ``log``, B - A is the difference of log10 values (a log ratio), values under ``floor`` taken as ``floor``.
    """

    if log:
        sc = log_scale(
            np.concatenate([ma.ravel(), mb.ravel()]), floor=floor, floor_what="a tenth of one sample's share"
        )
        lo = sc.vmin
        diff = np.log10(np.maximum(mb, lo)) - np.log10(np.maximum(ma, lo))
    else:
        both = np.concatenate([ma.ravel(), mb.ravel()])
        both = both[np.isfinite(both)]
        lo_v, hi_v = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        sc = Scale(lo_v, hi_v if hi_v > lo_v else lo_v + 1.0, False, "")
        diff = mb - ma
    dsc = symmetric_scale(diff)
    sa = sb = sc
    if not shared:
        sa, sb = (Scale(*(lambda v: (v.min(), v.max() if v.max() > v.min() else v.min() + 1))(m[np.isfinite(m)]),
                        False, " (own scale)") for m in (ma, mb))  # fmt: skip
    cm_ab = floor_cmap(cmap) if log else _cmap(cmap)  # log: zeros at the floor; otherwise NaN (no data) is grey
    panels = [(ma, names[0], cm_ab, sa, what), (mb, names[1], cm_ab, sb, what),
              (diff, f"{names[1]} - {names[0]}", _cmap("RdBu_r", bad="0.88"), dsc, diff_what)]  # fmt: skip
    for ax, (m, title, cm, s, label) in zip(row, panels):
        im = ax.imshow(m.T, origin="lower", aspect="auto", cmap=cm, norm=s.norm(), interpolation="nearest",
                       extent=extent)  # fmt: skip
        ax.set_title(f"{title}", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.05).set_label(s.label(label), fontsize=6)


def plot_compare(a, b, names=("A", "B"), points: int = 200):
    """Two profiles of the same model side by side, and their difference (B - A): laminar profiles (log colour;
    the difference in log10 density), the log10-weight histogram, down_proj norms by layer and relative position
    (prompt sets of any lengths) and the per-head summary statistics. Each difference is on a symmetric, robust
    scale whose colourbar says what it clips."""
    from .laminar import LAMINAR_KINDS, laminar_data

    plt = pyplot()
    a.check_compatible_model(b)
    kinds = tuple(LAMINAR)
    stats = (ENTROPY.summary, SINK.summary, PREV.summary, DIST.summary)
    n_rows = len(kinds) + 2 + len(stats)
    fig, axes = plt.subplots(n_rows, 3, figsize=(15, 3.1 * n_rows), squeeze=False, layout="constrained")
    for r, kind in enumerate(kinds):
        y, da, what, ylabel, _, fa = laminar_data(a, kind, points, also=(b,))
        _, db, _, _, _, fb = laminar_data(b, kind, points, also=(a,))
        dy = (y[-1] - y[0]) / max(len(y) - 1, 1)
        extent = (-0.5, da.shape[0] - 0.5, y[0] - dy / 2, y[-1] + dy / 2)
        floor = min(f for f in (fa, fb) if f > 0) if max(fa, fb) > 0 else None
        _triple(fig, axes[r], da, db, names, what, "magma", ylabel, extent, log=True,
                diff_what=f"log10 ratio of {what}", floor=floor)  # fmt: skip
        axes[r][0].set_title(f"{LAMINAR_KINDS[kind]}: {names[0]}", fontsize=8)
        axes[r][1].set_title(f"{LAMINAR_KINDS[kind]}: {names[1]}", fontsize=8)
        axes[r][2].set_title(f"{LAMINAR_KINDS[kind]}: {names[1]} - {names[0]} (log10 ratio)", fontsize=8)
    for r, which in enumerate(("in", "out"), start=len(kinds)):
        # log10: the first token's norms are often 100x the rest; the difference is then a log ratio
        bins = int(min(50, np.diff(a.offsets).min(), np.diff(b.offsets).min()))
        ma = np.log10(down_proj_by_position(a, which, bins))  # [layers, position bins]
        mb = np.log10(down_proj_by_position(b, which, bins))
        _triple(fig, axes[r], ma, mb, names, "log10 L2 norm", "magma", "relative position",
                (-0.5, ma.shape[0] - 0.5, 0.0, 1.0), diff_what="log10 ratio")  # fmt: skip
        for c, t in enumerate((names[0], names[1], f"{names[1]} - {names[0]}")):
            axes[r][c].set_title(f"down_proj {which}put norm: {t}", fontsize=8)
    sa, sb = head_summary(a), head_summary(b)
    for r, s in enumerate(stats, start=len(kinds) + 2):
        # each on its own scale: the spread between the heads of one set shows; the difference panel compares
        _triple(fig, axes[r], sa[s], sb[s], names, s, "viridis", "head", diff_what=f"{s} difference", shared=False)
        for c, t in enumerate((names[0], names[1], f"{names[1]} - {names[0]}")):
            axes[r][c].set_title(f"{HEAD_COLUMNS[s]}: {t}", fontsize=8)
    fig.suptitle(
        f"{a.meta.get('model_id')}: {names[0]} ({len(a.prompts)} prompts, {a.n_tokens} tokens) vs {names[1]} "
        f"({len(b.prompts)} prompts, {b.n_tokens} tokens)",
        fontsize=11,
    )
    return fig
