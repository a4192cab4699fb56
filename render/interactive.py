"""Plotly views (imported lazily: ``pip install attnscope[render]``): interactive laminar heatmaps and the 3-D
scatter of tokens x layers x top down_proj neurons."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .laminar import LAMINAR_KINDS
from .summary import token_labels

__all__ = ["HAS_PLOTLY", "down_proj_scatter", "laminar_figure", "write_standalone"]

try:
    import plotly  # noqa: F401

    HAS_PLOTLY = True
except ImportError:  # pragma: no cover - exercised where plotly is missing
    HAS_PLOTLY = False


def _go():
    if not HAS_PLOTLY:
        raise ImportError("interactive views need plotly: pip install 'attnscope[render]' (or plotly)")
    import plotly.graph_objects as go

    return go


def laminar_figure(prof, kind: str = "self", points: int = 300, head: int | None = None):
    """Interactive laminar heatmap: X layer, Y attention weight, colour KDE density."""
    go = _go()
    grid, dens = prof.laminar(kind, points=points, head=head)
    who = "all heads pooled" if head is None else f"head {head}"
    fig = go.Figure(
        go.Heatmap(
            z=dens.T,
            x=np.arange(prof.n_layers),
            y=grid,
            colorscale="Magma",
            colorbar={"title": "density"},
            hovertemplate="layer %{x}<br>weight %{y:.3f}<br>density %{z:.3g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"laminar: {LAMINAR_KINDS[kind]} ({who})",
        xaxis_title="layer",
        yaxis_title="attention weight",
        height=380,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def down_proj_scatter(prof, prompt: int = 0, max_points: int = 20000):
    """3-D scatter: token position x layer x neuron index for each token's top-k down_proj neurons; marker size
    and colour by |activation|."""
    go = _go()
    sl = prof.prompt_slice(prompt)
    idx = prof.arrays["mlp.topk_idx"][:, sl]  # [layers, L, k]
    val = prof.arrays["mlp.topk_val"][:, sl]
    Ly, L, k = idx.shape
    layer, pos, rank = np.meshgrid(np.arange(Ly), np.arange(L), np.arange(k), indexing="ij")
    x, y, z, v = pos.ravel(), layer.ravel(), idx.ravel(), val.ravel()
    if x.size > max_points:  # keep the strongest activations
        keep = np.argsort(-np.abs(v))[:max_points]
        x, y, z, v = x[keep], y[keep], z[keep], v[keep]
    labels = np.array(token_labels(prof, prompt), dtype=object)
    a = np.abs(v)
    size = 2 + 10 * a / (a.max() or 1.0)
    fig = go.Figure(
        go.Scatter3d(
            x=x,
            y=y,
            z=z,
            mode="markers",
            marker={"size": size, "color": v, "colorscale": "RdBu", "cmid": 0, "colorbar": {"title": "activation"}},
            text=[f"{labels[i]!r} (pos {i})" for i in x],
            hovertemplate="%{text}<br>layer %{y}<br>neuron %{z}<br>value %{marker.color:.3g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"top-{k} down_proj neurons per token, prompt {prompt}",
        height=600,
        scene={"xaxis_title": "token position", "yaxis_title": "layer", "zaxis_title": "neuron"},
    )
    return fig


def write_standalone(fig, path: str | Path) -> Path:
    """A standalone HTML file with plotly.js embedded (opens without a network)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
