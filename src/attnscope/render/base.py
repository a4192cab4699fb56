"""Renderer base class: a renderer turns a ``Profile`` into files, and never needs the model or torch."""

from __future__ import annotations

from pathlib import Path

__all__ = ["Renderer", "floor_cmap", "pyplot"]


class Renderer:
    """One output backend. Subclasses set the class attributes and implement ``render``."""

    output_file_extension: str = "png"
    output_is_binary: bool = True

    def render(self, profile, out_dir: str | Path) -> list[Path]:  # pragma: no cover - interface
        """Draw ``profile`` into ``out_dir`` and return the paths written."""
        raise NotImplementedError


def pyplot():
    """matplotlib's pyplot on the Agg backend (imported on first use: importing a renderer loads no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def floor_cmap(name: str):
    """The colour map ``name`` with values under its range and NaN drawn in its lowest colour (a log scale's floor)."""
    import matplotlib

    cm = matplotlib.colormaps[name]
    return cm.with_extremes(bad=cm(0.0), under=cm(0.0))
