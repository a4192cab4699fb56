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


def laminar_figure(prof, kind: str = "self", points: int = 300, head: int | None = None, scale: str = "log"):
    """Interactive laminar heatmap: X layer, Y attention weight (or log10 weight for ``kind="log"``), colour the
    density on a log10 scale (default; values under a tenth of one sample's share drawn at that floor, as the
    title says), per-layer normalised (``scale="layer"``) or linear."""
    from .laminar import laminar_data, laminar_scale

    go = _go()
    y, values, what, ylabel, _, floor = laminar_data(prof, kind, points, head=head)
    img, sc = laminar_scale(values, scale, floor)
    who = "all heads pooled" if head is None else f"head {head}"
    if sc.log:
        z = np.log10(np.clip(img, sc.vmin, None))
        title, zmin, zmax, fmt = f"log10 {what}", np.log10(sc.vmin), np.log10(sc.vmax), "10^%{z:.2f}"
    else:
        z, title, zmin, zmax, fmt = img, what, sc.vmin, sc.vmax, "%{z:.3g}"
    clip = sc.note.strip().strip("()")
    fig = go.Figure(
        go.Heatmap(
            z=z.T,  # [len(y), layers]
            x=np.arange(prof.n_layers),
            y=y,
            zmin=zmin,
            zmax=zmax,
            colorscale="Magma",
            colorbar={"title": {"text": title, "side": "right"}},
            hovertemplate=f"layer %{{x}}<br>{ylabel} %{{y:.3f}}<br>{what} {fmt}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": f"{LAMINAR_KINDS[kind]} ({who})<br><sup>{clip}</sup>", "font": {"size": 14}},
        xaxis_title="layer",
        yaxis_title=ylabel,
        height=400,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
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
    ok = (z >= 0) & np.isfinite(v)  # mixture-of-experts layers have no single neuron space: none recorded there
    x, y, z, v = x[ok], y[ok], z[ok], v[ok]
    if x.size > max_points:  # keep the strongest activations
        keep = np.argsort(-np.abs(v))[:max_points]
        x, y, z, v = x[keep], y[keep], z[keep], v[keep]
    labels = np.array(token_labels(prof, prompt), dtype=object)
    a = np.abs(v)
    # a few massive activations would bleach every other marker: the colour is clipped at the 99th percentile of
    # |value| (stated in the colourbar), the size follows sqrt(|value|) unclipped
    lim = float(np.percentile(a, 99)) if a.size else 1.0
    lim = lim or float(a.max()) or 1.0
    over = int(np.sum(a > lim))
    top = float(a.max()) if a.size else 1.0
    size = 2 + 10 * np.sqrt(a / (top or 1.0))
    cbar = "activation" + (f"<br>(colour clipped at ±{lim:.3g};<br>{over} larger, up to {top:.3g})" if over else "")
    fig = go.Figure(
        go.Scatter3d(
            x=x,
            y=y,
            z=z,
            mode="markers",
            marker={
                "size": size,
                "color": v,
                "colorscale": "RdBu_r",
                "cmin": -lim,
                "cmax": lim,
                "colorbar": {"title": {"text": cbar}},
            },
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
