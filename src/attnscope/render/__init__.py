"""attnscope.render: estimators and figures drawn from a saved ``Profile`` alone (no torch, no model)."""

from __future__ import annotations

__all__ = ["BinnedKDE", "ExactKDE", "LaminarRenderer", "render_laminar"]


def __getattr__(name: str):
    if name in ("BinnedKDE", "ExactKDE"):
        from . import kde

        return getattr(kde, name)
    if name in ("LaminarRenderer", "render_laminar"):
        from . import laminar

        return getattr(laminar, name)
    raise AttributeError(f"module 'attnscope.render' has no attribute {name!r}")
