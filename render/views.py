"""Matplotlib views of a saved profile: attention heatmaps, attention patterns, the layer grid, down_proj
norms and the comparison of two profiles. Each function returns the figure; ``save`` writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .summary import (
    HEAD_COLUMNS,
    attention_matrix,
    check_layer_head,
    down_proj_by_position,
    head_summary,
    high_entropy_positions,
    received,
    token_labels,
)

__all__ = ["plot_compare", "plot_down_proj", "plot_heatmaps", "plot_layer_grid", "plot_patterns", "save"]

MAX_LABELS = 40  # token labels per axis before thinning


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return path


def _label_ticks(ax, labels: list[str], axis: str, max_labels: int = MAX_LABELS) -> None:
    """Token labels on an axis in token positions, every k-th one when there are too many to read."""
    n = len(labels)
    step = max(1, int(np.ceil(n / max_labels)))
    pos = np.arange(0, n, step)
    text = [repr(labels[i])[1:-1][:12] for i in pos]
    if axis == "x":
        ax.set_xticks(pos, text, rotation=90, fontsize=6)
    else:
        ax.set_yticks(pos, text, fontsize=6)


def _crosshairs(ax, positions) -> None:
    for p in positions:
        ax.axhline(p, color="yellow", lw=0.8, alpha=0.9)
        ax.axvline(p, color="yellow", lw=0.8, alpha=0.9)


def _draw_matrix(ax, m: np.ndarray, length: int, cmap: str, vmin=None, vmax=None):
    # the matrix (full L x L or pooled R x R) is drawn over token positions, so labels and marks line up
    return ax.imshow(
        m,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        aspect="auto",
        extent=(-0.5, length - 0.5, length - 0.5, -0.5),
    )


def plot_heatmaps(prof, pairs, prompt: int = 0, mark_top: int = 5, cmap: str = "viridis"):
    """2-D heatmaps (query on Y, key on X) of the given (layer, head) pairs of one prompt.

    A head's kept full matrix is drawn when there is one, else its pooled thumbnail; the ``mark_top``
    positions of highest next-token entropy get yellow cross-hairs.
    """
    plt = _plt()
    for layer, head in pairs:
        check_layer_head(prof, layer, head)
    labels = token_labels(prof, prompt)
    marks = high_entropy_positions(prof, prompt, mark_top) if mark_top else []
    n = len(pairs)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 5.0 * rows), squeeze=False, layout="constrained")
    for i, (layer, head) in enumerate(pairs):
        ax = axes[i // cols][i % cols]
        m, full, L = attention_matrix(prof, prompt, layer, head)
        im = _draw_matrix(ax, m, L, cmap)
        _crosshairs(ax, marks)
        _label_ticks(ax, labels, "x")
        _label_ticks(ax, labels, "y")
        kind = "full" if full else f"pooled {m.shape[0]}x{m.shape[1]}"
        ax.set_title(f"layer {layer} head {head} ({kind})", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"{prof.meta.get('model_id')}: attention, prompt {prompt}", fontsize=10)
    return fig


def plot_patterns(prof, pairs, prompt: int = 0, mode: str = "mean", token: int | None = None):
    """1-D bar charts per (layer, head): attention received per key ('mean' or 'max'), or one token's row."""
    plt = _plt()
    labels = token_labels(prof, prompt)
    series = [received(prof, prompt, layer, head, mode, token) for layer, head in pairs]
    L = len(labels)
    fig, axes = plt.subplots(len(pairs), 1, figsize=(max(6.0, 0.12 * min(L, 200) + 3), 2.4 * len(pairs)), squeeze=False)
    what = {"mean": "mean attention received", "max": "max attention received"}.get(
        mode, f"attention of token {L - 1 if token is None else token}"
    )
    for ax, (layer, head), y in zip(axes[:, 0], pairs, series):
        ax.bar(np.arange(L), y, width=0.9, color="tab:blue")
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylabel("weight", fontsize=8)
        ax.set_title(f"layer {layer} head {head}: {what}", fontsize=9)
        _label_ticks(ax, labels, "x", max_labels=80)
    fig.tight_layout()
    return fig


def plot_layer_grid(prof, layers, head: int | None = None, prompt: int = 0, mark_top: int = 5, cmap: str = "RdBu_r"):
    """Paper-style grid of the chosen layers (heads averaged, or one head) on ONE shared colour scale."""
    plt = _plt()
    for layer in layers:
        check_layer_head(prof, layer, head)
    mats = [attention_matrix(prof, prompt, layer, head) for layer in layers]
    vmin = 0.0
    vmax = max(float(np.max(m)) for m, _, _ in mats) or 1.0
    marks = high_entropy_positions(prof, prompt, mark_top) if mark_top else []
    cols = min(len(layers), 4)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    im = None
    for i, (layer, (m, _full, L)) in enumerate(zip(layers, mats)):
        ax = axes[i // cols][i % cols]
        im = _draw_matrix(ax, m, L, cmap, vmin=vmin, vmax=vmax)
        _crosshairs(ax, marks)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=6)
    for j in range(len(layers), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label="attention weight")
    who = "heads averaged" if head is None else f"head {head}"
    fig.suptitle(f"{prof.meta.get('model_id')}: layer grid ({who}), prompt {prompt}", fontsize=10)
    return fig


def plot_down_proj(prof, prompt: int = 0, mark_top: int = 5):
    """Token x layer heatmaps of the down_proj input (neuron activations) and output L2 norms."""
    plt = _plt()
    sl = prof.prompt_slice(prompt)
    labels = token_labels(prof, prompt)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(4.0, 0.12 * min(len(labels), 120) + 2)), squeeze=False)
    for ax, name, title in zip(axes[0], ("mlp.in_norm", "mlp.out_norm"), ("down_proj input", "down_proj output")):
        m = prof.arrays[name][:, sl].T  # [tokens, layers]
        im = ax.imshow(m, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_xlabel("layer")
        ax.set_title(f"{title} L2 norm", fontsize=9)
        _label_ticks(ax, labels, "y", max_labels=60)
        for p in high_entropy_positions(prof, prompt, mark_top) if mark_top else []:
            ax.axhline(p, color="yellow", lw=0.8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{prof.meta.get('model_id')}: down_proj norms, prompt {prompt}", fontsize=10)
    return fig


def _triple(fig, row, ma, mb, names, what, cmap, ylabel, extent=None):
    """A and B on one colour scale and B - A on a symmetric one, as [layers, y] heatmaps."""
    vmin = min(0.0, np.nanmin([np.nanmin(ma), np.nanmin(mb)]))
    vmax = np.nanmax([np.nanmax(ma), np.nanmax(mb)])
    diff = mb - ma
    lim = np.nanmax(np.abs(diff)) or 1.0
    panels = [(ma, names[0], cmap, vmin, vmax), (mb, names[1], cmap, vmin, vmax),
              (diff, f"{names[1]} - {names[0]}", "RdBu_r", -lim, lim)]  # fmt: skip
    for ax, (m, title, cm, lo, hi) in zip(row, panels):
        im = ax.imshow(m.T, origin="lower", aspect="auto", cmap=cm, vmin=lo, vmax=hi, interpolation="nearest",
                       extent=extent)  # fmt: skip
        ax.set_title(f"{what}: {title}", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)


def plot_compare(a, b, names=("A", "B"), points: int = 200):
    """Two profiles of the same model side by side, and their difference (B - A): laminar profiles, down_proj
    norms by layer and relative position (prompt sets of any lengths), and the per-head summary statistics."""
    plt = _plt()
    a.check_compatible_model(b)
    kinds = ("self", "final", "all")
    stats = ("entropy", "sink", "prev", "distance")
    n_rows = len(kinds) + 2 + len(stats)
    fig, axes = plt.subplots(n_rows, 3, figsize=(14, 3.0 * n_rows), squeeze=False)
    for r, kind in enumerate(kinds):
        grid, da = a.laminar(kind, points=points)
        _, db = b.laminar(kind, points=points)
        extent = (-0.5, da.shape[0] - 0.5, grid[0], grid[-1])
        _triple(fig, axes[r], da, db, names, f"laminar {kind}", "magma", "attention weight", extent)
    for r, which in enumerate(("in", "out"), start=len(kinds)):
        # log10: the first token's norms are often 100x the rest; the difference is then a log ratio
        bins = int(min(50, np.diff(a.offsets).min(), np.diff(b.offsets).min()))
        ma = np.log10(down_proj_by_position(a, which, bins))  # [layers, position bins]
        mb = np.log10(down_proj_by_position(b, which, bins))
        _triple(fig, axes[r], ma, mb, names, f"log10 down_proj {which}put norm", "magma", "relative position",
                (-0.5, ma.shape[0] - 0.5, 0.0, 1.0))  # fmt: skip
    sa, sb = head_summary(a), head_summary(b)
    for r, s in enumerate(stats, start=len(kinds) + 2):
        _triple(fig, axes[r], sa[s], sb[s], names, HEAD_COLUMNS[s], "viridis", "head")
    fig.suptitle(f"{a.meta.get('model_id')}: {names[0]} vs {names[1]}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig
