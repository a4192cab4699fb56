"""Laminar profiles as heatmaps: X layer, Y attention weight in [0, 1], colour the KDE density."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Renderer

__all__ = ["LAMINAR_KINDS", "LaminarRenderer", "render_laminar"]

LAMINAR_KINDS = {
    "self": "self-attention p(i, i)",
    "final": "final token's attention p(L-1, j)",
    "all": "all causal pairs p(i, j)",
}


def _draw(ax, grid: np.ndarray, density: np.ndarray, title: str, cmap: str):
    n_layers = density.shape[0]
    im = ax.imshow(
        density.T,  # [points, layers]
        origin="lower",
        aspect="auto",
        extent=(-0.5, n_layers - 0.5, grid[0], grid[-1]),
        cmap=cmap,
        interpolation="nearest",
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("attention weight")
    ax.set_title(title, fontsize=9)
    return im


class LaminarRenderer(Renderer):
    """One PNG (or PDF) per kind of weights, all layers; optionally one grid of per-head panels per kind.

    Args:
        kinds: any of ``"self"``, ``"final"``, ``"all"``.
        points: KDE grid size on [0, 1].
        per_head: also draw a figure per kind with one panel per head.
        fmt: ``"png"`` or ``"pdf"``.
        cmap: matplotlib colour map.
    """

    def __init__(
        self,
        kinds=("self", "final", "all"),
        points: int = 300,
        per_head: bool = False,
        fmt: str = "png",
        cmap: str = "magma",
        dpi: int = 120,
    ):
        unknown = [k for k in kinds if k not in LAMINAR_KINDS]
        if unknown:
            raise ValueError(f"unknown laminar kind(s) {unknown}: choose from {', '.join(LAMINAR_KINDS)}")
        if fmt not in ("png", "pdf"):
            raise ValueError(f"fmt must be png or pdf, got {fmt!r}")
        self.kinds, self.points, self.per_head, self.cmap, self.dpi = tuple(kinds), points, per_head, cmap, dpi
        self.output_file_extension = fmt

    def render(self, profile, out_dir) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        model = profile.meta.get("model_id", "model")
        n_tok = profile.n_tokens
        for kind in self.kinds:
            grid, density = profile.laminar(kind, points=self.points)
            fig, ax = plt.subplots(figsize=(max(5.0, 0.22 * profile.n_layers + 2), 4.2))
            im = _draw(
                ax,
                grid,
                density,
                f"{model}: {LAMINAR_KINDS[kind]}\n{len(profile.prompts)} prompt(s), {n_tok} tokens, all heads pooled",
                self.cmap,
            )
            fig.colorbar(im, ax=ax, label="density")
            fig.tight_layout()
            path = out_dir / f"laminar_{kind}.{self.output_file_extension}"
            fig.savefig(path, dpi=self.dpi)
            plt.close(fig)
            written.append(path)
            if self.per_head:
                H = profile.n_heads
                cols = min(H, 6)
                rows = -(-H // cols)
                fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
                for h in range(rows * cols):
                    ax = axes[h // cols][h % cols]
                    if h >= H:
                        ax.axis("off")
                        continue
                    g, d = profile.laminar(kind, points=self.points, head=h)
                    _draw(ax, g, d, f"head {h}", self.cmap)
                fig.suptitle(f"{model}: {LAMINAR_KINDS[kind]}, per head")
                fig.tight_layout()
                path = out_dir / f"laminar_{kind}_heads.{self.output_file_extension}"
                fig.savefig(path, dpi=self.dpi)
                plt.close(fig)
                written.append(path)
        return written


def render_laminar(profile, out_dir, **kwargs) -> list[Path]:
    """Shorthand for ``LaminarRenderer(**kwargs).render(profile, out_dir)``."""
    return LaminarRenderer(**kwargs).render(profile, out_dir)
