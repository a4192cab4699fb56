"""attnscope: per-layer, per-head attention statistics of Hugging Face causal LMs, without attention matrices.

    import attnscope
    prof = attnscope.profile(model, tokenizer, ["some text", "more text"])
    prof.save("runs/x"); prof = attnscope.load("runs/x")
    grid, density = prof.laminar("self", points=300)   # density: [layers, points]

Importing attnscope imports neither torch, triton, numba nor plotly; they load on first use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__version__ = "0.1.0"

__all__ = ["Profile", "ProfileConfig", "ProfileError", "__version__", "cache_dir", "load", "profile", "run_with_stats"]


def cache_dir() -> Path:
    """Where attnscope keeps what it caches (the default model, Numba's compiled kernels, side environments):
    ``$ATTNSCOPE_CACHE``, else ``$XDG_CACHE_HOME/attnscope``, else ``~/.cache/attnscope``."""
    if os.environ.get("ATTNSCOPE_CACHE"):
        return Path(os.environ["ATTNSCOPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnscope"


def _numba_cache() -> None:
    """Numba caches compiled functions next to their source by default, i.e. in ``site-packages/attnscope/...
    /__pycache__`` for an installed copy; a later ``pip install -e`` removes the package but not that folder,
    which Python then takes for an empty ``attnscope`` package that hides the editable one. So Numba's cache
    goes under ``cache_dir()/numba`` unless the user chose a place (``NUMBA_CACHE_DIR``)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba")
    config = sys.modules.get("numba.core.config")  # numba read the environment when it was imported
    if config is not None:
        config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


_numba_cache()


def __getattr__(name: str):
    if name in __all__ and name != "__version__":
        import attnscope.profiler

        return getattr(attnscope.profiler, name)
    raise AttributeError(f"module 'attnscope' has no attribute {name!r}")
