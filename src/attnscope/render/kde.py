"""The laminar profiles' Gaussian KDE estimators, where renderers have always imported them from; they live in
``attnscope.kernels.kde`` (a numerical kernel: numpy and Numba, no torch), which ``Profile.laminar`` uses too."""

from __future__ import annotations

from attnscope.kernels.kde import HAS_NUMBA, BinnedKDE, ExactKDE, KDEWarning, scott_bandwidth

__all__ = ["HAS_NUMBA", "BinnedKDE", "ExactKDE", "KDEWarning", "scott_bandwidth"]
