"""Launch heuristics and limits of the Triton kernels, in one place."""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

__all__ = [
    "MAX_HEAD_DIM",
    "MAX_SEQ",
    "check_interpreter",
    "down_proj_settings",
    "is_interpreter",
    "qk_stats_settings",
]

MAX_HEAD_DIM = 256
MAX_SEQ = 1 << 24  # distance buckets use the float32 exponent of (i - j + 1): exact below 2^24
MAX_BINS = 8192  # a compile-time constant of the kernel (its [B, H, bins] int32 histograms grow with it)


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _loop_bound_probe_kernel(OUT, N):
    """A loop whose bound is loaded from memory, as every attnscope kernel has."""
    n = tl.load(N)
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(OUT, acc)


@functools.cache
def _interpreter_problem() -> str | None:
    import numpy as np
    import torch

    out, n = torch.zeros(1, dtype=torch.int32), torch.full((1,), 3, dtype=torch.int32)
    try:
        _loop_bound_probe_kernel[(1,)](out, n)
    except Exception as e:  # the interpreter wraps the TypeError
        return (
            f"the triton {triton.__version__} interpreter cannot run attnscope's kernels with numpy {np.__version__} "
            f"(a loop bound loaded from memory fails: {e}); use numpy < 2.4 or triton >= 3.9 with TRITON_INTERPRET=1"
        )
    return None if int(out[0]) == 3 else f"the triton {triton.__version__} interpreter miscounts a loop"


def check_interpreter() -> None:
    """Under ``TRITON_INTERPRET=1``, ``RuntimeError`` (one line) where this triton's interpreter cannot run the
    kernels: triton 3.6's turns a loop bound into a one-element array, which numpy >= 2.4 refuses as an index."""
    if is_interpreter():
        problem = _interpreter_problem()
        if problem:
            raise RuntimeError(problem)


def qk_stats_settings(head_dim: int, seq_len: int, bins: int, thumb_size: int, dtype: str = "bfloat16") -> dict:
    """Tiles, warps and padded sizes of the attention-statistics kernel; ``RuntimeError`` names the limit.

    One fixed configuration (no autotuning: a new length never compiles anything new).
    """
    if head_dim > MAX_HEAD_DIM:
        raise RuntimeError(f"qk_stats supports head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if seq_len >= MAX_SEQ:
        raise RuntimeError(f"qk_stats supports sequences shorter than {MAX_SEQ} tokens, got {seq_len}")
    if bins > MAX_BINS:
        raise RuntimeError(f"qk_stats supports at most {MAX_BINS} histogram bins, got {bins}")
    # 64 x 32 tiles over 8 warps: 8 (row, key) pairs a thread, 225-229 registers and no spills at d_head 80 and
    # 128 on sm_90 with triton 3.6 and 3.9 (64 x 64 over 4 warps spills; `kernels/_compile_check.py` measures it).
    # The length only enters as a runtime argument, so a new length compiles nothing.
    # float32 inputs take the FMA (ieee) dot, heavier on registers: 64 x 16 tiles (no spills at d_head 64)
    return {
        "HEAD_DIM_PAD": max(16, triton.next_power_of_2(head_dim)),  # d_head 80 -> 128 with masked loads
        "BLOCK_M": 64,
        "BLOCK_N": 16 if dtype == "float32" else 32,
        "num_warps": 8,
        "num_stages": 2,
    }


def down_proj_settings(d_ff: int, d_model: int, top_k: int) -> dict:
    """Chunk sizes for the down_proj statistics kernel."""
    if top_k > 64:
        raise RuntimeError(f"down_proj_stats supports top_k <= 64, got {top_k}")
    block_f = min(256, triton.next_power_of_2(d_ff))
    if top_k > block_f:
        raise RuntimeError(f"top_k {top_k} exceeds the neuron chunk {block_f}")
    # 8 warps: no spills on sm_80 and sm_90 (4 warps spill 12 bytes on sm_80 with the 8 rounds of top-k)
    return {"BLOCK_T": 16, "BLOCK_F": block_f, "BLOCK_O": min(256, triton.next_power_of_2(d_model)), "num_warps": 8}
