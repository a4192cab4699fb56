"""Down-projection statistics on the CPU in two Numba passes over X [T, d_ff] (outputs as
``reference.down_proj_stats_ref``), plus the running top-k tokens of every neuron.

- rows, parallel over tokens: the norms of x and y, and the k neurons of largest |x| (a sorted insertion list: a
  neuron enters only when it beats the k-th, which after the first few is rare);
- columns, parallel over blocks of neurons (each task reads its 64 columns of every row in turn): per neuron the
  sum and sum of squares in float64, and its ``contexts`` largest activations with their tokens, by the same
  insertion; the first of them is the neuron's max and argmax.

Ties keep the earlier neuron / token (an insertion needs a strictly larger value), so the results do not depend on
the thread count, and, with a batch's tokens passed in run order, a tie goes to the lower token index in the run,
the rule of every maximum and top-k over tokens (``profiler.accum.combine_accum`` and ``topk_fold`` too).
torch.topk over the token axis of a [T, d_ff] array and max with argmax cost ~16 ms per layer of SmolLM2
at 2,048 tokens; these passes a few.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["down_proj_stats_numba"]

prange = range  # numba.prange once compiled
_rows = None
_cols = None
_COLS_PER_TASK = 64


def _rows_py(x, y, k, in_sq, out_sq, top_val, top_idx, top_mag):  # pragma: no cover - jitted
    T, F = x.shape
    for t in prange(T):
        row = x[t]
        s = 0.0
        for f in range(F):
            s += np.float64(row[f]) * np.float64(row[f])
        in_sq[t] = s
        yr = y[t]
        s = 0.0
        for o in range(yr.shape[0]):
            s += np.float64(yr[o]) * np.float64(yr[o])
        out_sq[t] = s
        idx = top_idx[t]
        mag = top_mag[t]  # |x| of the list, largest first (preallocated: prange bodies must not allocate)
        mag[:] = -1.0
        for f in range(F):
            v = abs(row[f])
            if v > mag[k - 1]:
                pos = k - 1
                while pos > 0 and mag[pos - 1] < v:
                    mag[pos] = mag[pos - 1]
                    idx[pos] = idx[pos - 1]
                    pos -= 1
                mag[pos] = v
                idx[pos] = f
        for j in range(k):
            top_val[t, j] = row[idx[j]]


def _cols_py(x, kc, width, n_sum, n_sq, c_val, c_idx):  # pragma: no cover - jitted
    T, F = x.shape
    for blk in prange((F + width - 1) // width):
        f0 = blk * width
        f1 = min(F, f0 + width)
        for t in range(T):
            row = x[t]
            for f in range(f0, f1):
                v = row[f]
                n_sum[f] += v
                n_sq[f] += np.float64(v) * np.float64(v)
                if v > c_val[kc - 1, f]:
                    pos = kc - 1
                    while pos > 0 and c_val[pos - 1, f] < v:
                        c_val[pos, f] = c_val[pos - 1, f]
                        c_idx[pos, f] = c_idx[pos - 1, f]
                        pos -= 1
                    c_val[pos, f] = v
                    c_idx[pos, f] = t


def _kernels():
    global _rows, _cols, prange
    if _rows is None:
        import numba

        prange = numba.prange
        jit = dict(parallel=True, cache=True, nogil=True, error_model="numpy")
        _rows = numba.njit(**jit)(_rows_py)
        _cols = numba.njit(**jit)(_cols_py)
    return _rows, _cols


def down_proj_stats_numba(
    x: torch.Tensor,  # [T, d_ff] on the CPU
    y: torch.Tensor,  # [T, d_model]
    top_k: int = 8,
    contexts: int = 0,
) -> dict[str, torch.Tensor]:
    """Outputs as ``reference.down_proj_stats_ref``; with ``contexts`` > 0 also ``ctx_value`` [c, d_ff] float32 and
    ``ctx_index`` [c, d_ff] int64, the c = min(contexts, T) largest activations of each neuron and their rows."""
    from ._cpu_fused import numba_threads

    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x [T, d_ff] and y [T, d_model] do not match: {tuple(x.shape)}, {tuple(y.shape)}")
    T, F = x.shape
    xn = x.detach().float().contiguous().numpy()
    yn = y.detach().float().contiguous().numpy()
    k = min(top_k, F)
    kc = max(1, min(contexts, T)) if T else 0
    in_sq, out_sq = np.zeros(T), np.zeros(T)
    top_val = np.zeros((T, k), np.float32)
    top_idx = np.zeros((T, k), np.int64)
    n_sum, n_sq = np.zeros(F), np.zeros(F)
    c_val = np.full((max(kc, 1), F), -np.inf, np.float32)
    c_idx = np.zeros((max(kc, 1), F), np.int64)
    if T and k:
        rows, cols = _kernels()
        with numba_threads():
            rows(xn, yn, k, in_sq, out_sq, top_val, top_idx, np.empty((T, k), np.float32))
            cols(xn, kc, _COLS_PER_TASK, n_sum, n_sq, c_val, c_idx)
    out = {
        "in_norm": torch.from_numpy(np.sqrt(in_sq).astype(np.float32)),
        "out_norm": torch.from_numpy(np.sqrt(out_sq).astype(np.float32)),
        "topk_idx": torch.from_numpy(top_idx),
        "topk_val": torch.from_numpy(top_val),
        "neuron_max": torch.from_numpy(c_val[0].copy()),
        "neuron_argmax": torch.from_numpy(c_idx[0].copy()),
        "neuron_sum": torch.from_numpy(n_sum),
        "neuron_sumsq": torch.from_numpy(n_sq),
    }
    if contexts > 0:
        out["ctx_value"] = torch.from_numpy(c_val[:kc])
        out["ctx_index"] = torch.from_numpy(c_idx[:kc])
    return out
