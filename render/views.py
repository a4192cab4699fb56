"""Matplotlib views of a saved profile: attention heatmaps, attention patterns, the layer grid, down_proj
norms and the comparison of two profiles. Each function returns the figure; ``save`` writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .summary import (
    HEAD_COLUMNS,
    attention_matrix,
    check_layer_head,
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


def _crosshairs(ax, positions, length: int) -> None:
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
        _crosshairs(ax, marks, L)
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
        _crosshairs(ax, marks, L)
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


def plot_compare(a, b, names=("A", "B"), points: int = 200):
    """Two profiles of the same model side by side, and their difference (B - A): laminar profiles, mean
    down_proj norms per layer, and the per-head summary statistics."""
    plt = _plt()
    a.check_compatible_model(b)
    kinds = ("self", "final", "all")
    stats = ("entropy", "sink", "prev", "distance")
    fig, axes = plt.subplots(
        len(kinds) + 1 + len(stats), 3, figsize=(14, 3.0 * (len(kinds) + 1 + len(stats))), squeeze=False
    )
    for r, kind in enumerate(kinds):
        grid, da = a.laminar(kind, points=points)
        _, db = b.laminar(kind, points=points)
        vmax = max(da.max(), db.max())
        diff = db - da
        lim = np.abs(diff).max() or 1.0
        for c, (m, title, cm, lo, hi) in enumerate(
            [
                (da, names[0], "magma", 0, vmax),
                (db, names[1], "magma", 0, vmax),
                (diff, f"{names[1]} - {names[0]}", "RdBu_r", -lim, lim),
            ]
        ):
            ax = axes[r][c]
            im = ax.imshow(
                m.T,
                origin="lower",
                aspect="auto",
                cmap=cm,
                vmin=lo,
                vmax=hi,
                extent=(-0.5, m.shape[0] - 0.5, grid[0], grid[-1]),
            )
            ax.set_title(f"laminar {kind}: {title}", fontsize=8)
            ax.set_xlabel("layer", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
    r = len(kinds)
    for c, name in enumerate(("mlp.in_norm", "mlp.out_norm")):
        ax = axes[r][c]
        ma, mb = a.arrays[name].mean(1), b.arrays[name].mean(1)  # [layers]
        ax.plot(ma, label=names[0])
        ax.plot(mb, label=names[1])
        ax.set_title(f"mean {name} per layer", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[r][2]
    ax.plot(b.arrays["mlp.in_norm"].mean(1) - a.arrays["mlp.in_norm"].mean(1), label="input")
    ax.plot(b.arrays["mlp.out_norm"].mean(1) - a.arrays["mlp.out_norm"].mean(1), label="output")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"down_proj norm difference ({names[1]} - {names[0]})", fontsize=8)
    ax.legend(fontsize=7)
    sa, sb = head_summary(a), head_summary(b)
    for i, s in enumerate(stats):
        row = axes[r + 1 + i]
        vmax = max(sa[s].max(), sb[s].max())
        diff = sb[s] - sa[s]
        lim = np.abs(diff).max() or 1.0
        for c, (m, title, cm, lo, hi) in enumerate(
            [
                (sa[s], names[0], "viridis", 0, vmax),
                (sb[s], names[1], "viridis", 0, vmax),
                (diff, "difference", "RdBu_r", -lim, lim),
            ]
        ):
            im = row[c].imshow(m.T, aspect="auto", cmap=cm, vmin=lo, vmax=hi, origin="lower")
            row[c].set_title(f"{HEAD_COLUMNS[s]}: {title}", fontsize=8)
            row[c].set_xlabel("layer", fontsize=7)
            row[c].set_ylabel("head", fontsize=7)
            fig.colorbar(im, ax=row[c], fraction=0.046)
    fig.suptitle(f"{a.meta.get('model_id')}: {names[0]} vs {names[1]}", fontsize=11)
    fig.tight_layout()
    return fig
