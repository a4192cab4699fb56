"""attnscope.profiler: capture q/k and down_proj activations from Hugging Face models and build a ``Profile``,
in memory (``profile``) or streamed into a run directory shard by shard (``run_corpus`` + ``RunWriter``).

``Profile`` (``attnscope.profiler.data``) needs numpy only; the capture and run modules load torch and
transformers on first use, so renderers can read profiles without them.
"""

from __future__ import annotations

import importlib

__all__ = [
    "SCHEMA_VERSION",
    "Corpus",
    "PromptItem",
    "RunWriter",
    "load_run",
    "merge_runs",
    "run_corpus",
    "Profile",
    "ProfileConfig",
    "ProfileError",
    "PromptError",
    "UnsupportedModelError",
    "capture",
    "describe_layers",
    "down_proj_modules",
    "load",
    "model_geometry",
    "profile",
    "run_with_stats",
]

_WHERE = {
    "SCHEMA_VERSION": "data",
    "Profile": "data",
    "ProfileError": "data",
    "load": "store",
    "Corpus": "corpus",
    "PromptItem": "corpus",
    "RunWriter": "store",
    "load_run": "store",
    "merge_runs": "store",
    "run_corpus": "run",
    "UnsupportedModelError": "blocks",
    "describe_layers": "probe",
    "capture": "hooks",
    "down_proj_modules": "hooks",
    "model_geometry": "blocks",
    "ProfileConfig": "config",
    "PromptError": "config",
    "profile": "run",
    "run_with_stats": "run",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
