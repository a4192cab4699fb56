"""attnscope.kernels: attention and down_proj statistics, tensor in, tensor out (no Hugging Face imports).

``attn_stats`` dispatches CUDA tensors to the Triton kernels and CPU tensors to the blocked torch path;
``impl=`` forces either. References that materialise the attention live in ``attnscope.kernels.reference``;
what each statistic is (its name, kind, fold, tier, label) is declared once in ``attnscope.kernels.stats``, which
imports nothing, so importing it (or this package) loads no torch.
"""

from __future__ import annotations

import importlib

__all__ = [
    "ATTN_VECTOR_STATS",
    "N_DIST_BUCKETS",
    "AttnStatsSpec",
    "KeyRanges",
    "ScoreMod",
    "attn_stats",
    "attn_stats_torch",
    "down_proj_stats",
    "linear_bin",
    "log_bin",
    "set_cpu_threads",
    "thumb_edges",
]

_WHERE = {
    "ATTN_VECTOR_STATS": "contract",
    "N_DIST_BUCKETS": "stats",
    "AttnStatsSpec": "contract",
    "KeyRanges": "contract",
    "ScoreMod": "contract",
    "attn_stats": "dispatch",
    "attn_stats_torch": "torch_path",
    "down_proj_stats": "dispatch",
    "linear_bin": "contract",
    "log_bin": "contract",
    "set_cpu_threads": "_cpu_fused",
    "thumb_edges": "contract",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
