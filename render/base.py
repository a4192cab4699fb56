"""Renderer base class: a renderer turns a ``Profile`` into files, and never needs the model or torch."""

from __future__ import annotations

from pathlib import Path

__all__ = ["Renderer"]


class Renderer:
    """One output backend. Subclasses set the class attributes and implement ``render``."""

    output_file_extension: str = "png"
    output_is_binary: bool = True

    def render(self, profile, out_dir: str | Path) -> list[Path]:  # pragma: no cover - interface
        """Draw ``profile`` into ``out_dir`` and return the paths written."""
        raise NotImplementedError
