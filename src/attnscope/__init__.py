"""attnscope: per-layer, per-head attention statistics of Hugging Face causal LMs, without attention matrices.

    import attnscope
    prof = attnscope.profile(model, tokenizer, ["some text", "more text"])
    prof.save("runs/x"); prof = attnscope.load("runs/x")
    grid, density = prof.laminar("self", points=300)   # density: [layers, points]

Importing attnscope imports neither torch, triton, numba nor plotly; they load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Profile", "ProfileConfig", "ProfileError", "__version__", "load", "profile", "run_with_stats"]


def __getattr__(name: str):
    if name in __all__ and name != "__version__":
        import attnscope.profiler

        return getattr(attnscope.profiler, name)
    raise AttributeError(f"module 'attnscope' has no attribute {name!r}")
