"""attnscope.kernels: attention and down_proj statistics, tensor in, tensor out (no Hugging Face imports).

``attn_stats`` dispatches CUDA tensors to the Triton kernels and CPU tensors to the blocked torch path;
``impl=`` forces either. References that materialise the attention live in ``attnscope.kernels.reference``.
"""

from __future__ import annotations

from ._cpu_fused import set_cpu_threads
from .attn_stats_torch import attn_stats_torch
from .contract import ATTN_VECTOR_STATS, N_DIST_BUCKETS, AttnStatsSpec, KeyRanges, linear_bin, log_bin, thumb_edges
from .dispatch import attn_stats, down_proj_stats

__all__ = [
    "ATTN_VECTOR_STATS",
    "N_DIST_BUCKETS",
    "AttnStatsSpec",
    "KeyRanges",
    "attn_stats",
    "attn_stats_torch",
    "down_proj_stats",
    "linear_bin",
    "log_bin",
    "set_cpu_threads",
    "thumb_edges",
]
