"""Down-projection statistics in Triton: one read of X [T, d_ff] and one of Y [T, d_model].

One program per block of tokens walks the neurons chunk by chunk and keeps, per token, the sum of squares
and, per chunk, the K neurons of largest |x| (K rounds of argmax); per neuron it writes the block's max,
argmax, sum and sum of squares. A second tiny step in torch reduces the per-block partials and the per-chunk
top-K candidates (T x chunks x K numbers, not T x d_ff). The output's norm is read in the same program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._settings import check_interpreter, down_proj_settings, is_interpreter

__all__ = ["down_proj_stats_triton"]


@triton.jit
def _down_proj_act_norm_kernel(
    IN_SQ,
    OUT_SQ,  # [T] float32 sums of squares of x and y per token
    CAND_VAL,
    CAND_IDX,  # [T, n_chunks, K] top-K candidates per neuron chunk (signed value, neuron index)
    P_MAX,
    P_ARG,
    P_SUM,
    P_SQ,  # [n_tblocks, F] per-block neuron partials
    X,
    stride_xt,  # [T, F]
    Y,
    stride_yt,  # [T, O]
    T,
    F,
    O,
    N_CHUNKS,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Per-token norms and top-K neurons, per-neuron partials of one block of tokens; see the module docstring."""
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    sq = tl.zeros([BLOCK_T], tl.float32)
    for c in range(0, N_CHUNKS):
        offs_f = c * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        m = t_ok[:, None] & f_ok[None, :]
        x = tl.load(X + offs_t[:, None] * stride_xt + offs_f[None, :], mask=m, other=0.0).to(tl.float32)
        # -- per token --
        sq += tl.sum(x * x, 1)
        a = tl.where(m, tl.abs(x), -1.0)
        for r in tl.static_range(K):
            best = tl.argmax(a, 1)  # [BT] first position of the largest |x| left
            pick = tl.arange(0, BLOCK_F)[None, :] == best[:, None]
            val = tl.sum(tl.where(pick, x, 0.0), 1)
            base = offs_t * N_CHUNKS * K + c * K + r
            tl.store(CAND_VAL + base, val, mask=t_ok)
            tl.store(CAND_IDX + base, (c * BLOCK_F + best).to(tl.int32), mask=t_ok)
            a = tl.where(pick, -2.0, a)
        # -- per neuron, over this block of tokens --
        xm = tl.where(m, x, float("-inf"))
        tl.store(P_MAX + pid * F + offs_f, tl.max(xm, 0), mask=f_ok)
        tl.store(P_ARG + pid * F + offs_f, pid * BLOCK_T + tl.argmax(xm, 0), mask=f_ok)
        tl.store(P_SUM + pid * F + offs_f, tl.sum(x, 0), mask=f_ok)
        tl.store(P_SQ + pid * F + offs_f, tl.sum(x * x, 0), mask=f_ok)
    tl.store(IN_SQ + offs_t, sq, mask=t_ok)
    osq = tl.zeros([BLOCK_T], tl.float32)
    for o0 in range(0, O, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        y = tl.load(
            Y + offs_t[:, None] * stride_yt + offs_o[None, :], mask=t_ok[:, None] & (offs_o < O)[None, :], other=0.0
        ).to(tl.float32)
        osq += tl.sum(y * y, 1)
    tl.store(OUT_SQ + offs_t, osq, mask=t_ok)


def down_proj_stats_triton(
    x: torch.Tensor,  # [T, d_ff]
    y: torch.Tensor,  # [T, d_model]
    top_k: int = 8,
) -> dict[str, torch.Tensor]:
    """Down-projection statistics (outputs as ``reference.down_proj_stats_ref``)."""
    if not (x.is_cuda or is_interpreter()):
        raise ValueError("down_proj_stats_triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
    check_interpreter()
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x [T, d_ff] and y [T, d_model] do not match: {tuple(x.shape)}, {tuple(y.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    T, F = x.shape
    O = y.shape[1]
    k = min(top_k, F)
    st = down_proj_settings(F, O, k)
    BT, BF = st["BLOCK_T"], st["BLOCK_F"]
    n_chunks = triton.cdiv(F, BF)
    n_tb = triton.cdiv(T, BT)
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    in_sq, out_sq = torch.empty(T, **f32), torch.empty(T, **f32)
    cand_val = torch.empty(T, n_chunks, k, **f32)
    cand_idx = torch.empty(T, n_chunks, k, device=dev, dtype=torch.int32)
    p_max, p_sum, p_sq = (torch.empty(n_tb, F, **f32) for _ in range(3))
    p_arg = torch.empty(n_tb, F, device=dev, dtype=torch.int64)
    if T:
        _down_proj_act_norm_kernel[(n_tb,)](
            in_sq,
            out_sq,
            cand_val,
            cand_idx,
            p_max,
            p_arg,
            p_sum,
            p_sq,
            x,
            x.stride(0),
            y,
            y.stride(0),
            T,
            F,
            O,
            n_chunks,
            K=k,
            BLOCK_T=BT,
            BLOCK_F=BF,
            BLOCK_O=st["BLOCK_O"],
            num_warps=st["num_warps"],
        )
    # -- reduce the candidates and partials (small) --
    cv = cand_val.reshape(T, -1)  # [T, n_chunks * k]
    top = cv.abs().topk(k, dim=-1).indices
    mx, blk = p_max.max(dim=0)  # [F]
    return {
        "in_norm": in_sq.sqrt(),
        "out_norm": out_sq.sqrt(),
        "topk_idx": cand_idx.reshape(T, -1).gather(-1, top).long(),
        "topk_val": cv.gather(-1, top),
        "neuron_max": mx,
        "neuron_argmax": p_arg.gather(0, blk[None]).squeeze(0),
        "neuron_sum": p_sum.double().sum(0),
        "neuron_sumsq": p_sq.double().sum(0),
    }
