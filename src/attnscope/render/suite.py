"""Figures of a needle-in-a-haystack run: the depth x length accuracy grid, and per top retrieval head its
attention from the answer to the needle over the same grid."""

from __future__ import annotations

import numpy as np

from .base import pyplot

__all__ = ["plot_niah", "top_heads"]


def top_heads(score: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) of largest ``score`` [Ly, H] (NaN last; ties: the lower layer, then head)."""
    flat = np.nan_to_num(score, nan=-np.inf).reshape(-1)
    order = np.argsort(-flat, kind="stable")[:k]
    H = score.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]


def _grid(ax, values: np.ndarray, lengths, depths, title: str, cmap: str, vmin: float, vmax: float, fmt: str):
    """[depth, length] values as a heatmap with each cell's number written on it."""
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
    ax.set_xlabel("context length (tokens)", fontsize=8)
    ax.set_ylabel("needle depth", fontsize=8)
    ax.set_title(title, fontsize=9)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            shade = (v - vmin) / (vmax - vmin or 1.0)
            ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=6.5,
                    color="white" if shade < 0.5 else "black")  # fmt: skip
    return im


def plot_niah(lengths, depths, correct: np.ndarray, needle_mass: np.ndarray, retrieval: np.ndarray, top: int = 4):
    """The NIAH figure: ``correct`` [depth, length] (1, 0 or NaN for a cell without a prompt), ``needle_mass``
    [depth, length, Ly, H] (mean over the answer's rows of their weight on the needle) and ``retrieval``
    [depth, length, Ly, H] (the retrieval score); the top heads are those of largest mean retrieval score (then
    needle mass)."""
    plt = pyplot()
    mean_ret = np.nanmean(retrieval.reshape(-1, *retrieval.shape[2:]), 0)
    mean_mass = np.nanmean(needle_mass.reshape(-1, *needle_mass.shape[2:]), 0)
    heads = top_heads(mean_ret + 1e-6 * mean_mass, top)
    fig, axes = plt.subplots(1, 1 + len(heads), figsize=(3.2 * (1 + len(heads)), 3.0), squeeze=False)
    axes = axes[0]
    acc = np.nanmean(correct) if np.isfinite(correct).any() else float("nan")
    im = _grid(axes[0], correct, lengths, depths, f"answer correct (mean {acc:.2f})", "RdYlGn", 0.0, 1.0, ".0f")
    vmax = max(float(np.nanmax(needle_mass[..., [h[0] for h in heads], [h[1] for h in heads]])), 1e-3)
    for ax, (layer, head) in zip(axes[1:], heads):
        m = needle_mass[:, :, layer, head]
        im = _grid(ax, m, lengths, depths, f"L{layer} H{head}: answer -> needle mass\n(retrieval score "
                   f"{mean_ret[layer, head]:.2f})", "magma", 0.0, vmax, ".2f")  # fmt: skip
        ax.set_ylabel("")
    if heads:
        fig.colorbar(im, ax=list(axes[1:]), fraction=0.03, pad=0.02, label="mean attention mass on the needle")
    return fig, heads


def plot_span_heads(prof, prompt: int = 0):
    """Per key span, the [layers x heads] mass from the prompt's answer span (or its final row, ``last``) to it:
    where each head's attention goes between the prompt's named spans. None for a prompt without spans."""
    from attnscope.kernels.stats import ANSWER_SPAN, LAST_SPAN, span_key, span_names

    spans = prof.prompts[prompt].get("spans")
    if not spans:
        return None
    queries, keys = span_names(spans)
    q = ANSWER_SPAN if ANSWER_SPAN in queries else LAST_SPAN
    a = np.asarray(prof.arrays[span_key(prompt)])[:, :, queries.index(q), :, 0]  # [Ly, H, Sk]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys) + 1, 3.2), squeeze=False)
    for ax, (c, name) in zip(axes[0], enumerate(keys)):
        im = ax.imshow(a[:, :, c], cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        ax.set_title(f"{q} -> {name}", fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("layer", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, pad=0.02, label="mean attention mass")
    return fig
