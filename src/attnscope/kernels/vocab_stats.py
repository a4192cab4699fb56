"""The next-token distribution of many rows reduced over the vocabulary in Triton: matmul + online softmax.

One program per block of rows walks the vocabulary a tile at a time; each tile of logits z = h W^T (+ b) is
accumulated over d in registers and reduced on the spot to the running max m, Z = sum exp(z - m),
A = sum exp(z - m) (z - m), the best logit and its token, and the count of logits above the target's (the
target logit comes from one dot product per row, computed beforehand). The [T, V] logits never exist.
Outputs as ``reference.vocab_stats_ref``; the CPU path is ``vocab_stats_torch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._settings import check_interpreter, is_interpreter
from .vocab_stats_torch import finish, target_logits, validate_vocab_inputs

__all__ = ["vocab_stats_triton"]


@triton.jit
def _vocab_stats_online_kernel(
    M,
    ZS,
    A,
    BEST,  # [T] float32: running max, sum exp(z - m), sum exp(z - m)(z - m), best logit
    BEST_ID,  # [T] int64
    ABOVE,  # [T] int32 logits above the target's
    H,
    stride_ht,  # [T, D]
    W,
    stride_wv,  # [V, D]
    BIAS,  # [V] (read only when HAS_BIAS)
    TARGET,  # [T] int64, -1: none
    ZT,  # [T] float32 target logit
    T,
    V,
    D,
    cap_in,  # 1 / softcap (read only when SOFTCAP)
    cap_out,  # softcap
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online softmax statistics of one block of rows over the whole vocabulary; see the module docstring."""
    tl.static_assert(BLOCK_T >= 16 and BLOCK_V >= 16 and BLOCK_D >= 16)
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    tgt = tl.load(TARGET + offs_t, mask=t_ok, other=-1)
    zt = tl.load(ZT + offs_t, mask=t_ok, other=0.0)
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    z_i = tl.zeros([BLOCK_T], tl.float32)
    a_i = tl.zeros([BLOCK_T], tl.float32)
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK_T], tl.int64)
    above = tl.zeros([BLOCK_T], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        # -- logits of this vocabulary tile, accumulated over d --
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            hb = tl.load(
                H + offs_t[:, None] * stride_ht + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0
            )
            wb = tl.load(
                W + offs_v[:, None] * stride_wv + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0
            )
            if UPCAST:  # the interpreter's tl.dot mishandles bfloat16
                hb = hb.to(tl.float32)
                wb = wb.to(tl.float32)
            if IEEE:
                acc = tl.dot(hb, tl.trans(wb), acc, input_precision="ieee")
            else:
                acc = tl.dot(hb, tl.trans(wb), acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:  # softcap * tanh(z / softcap), tanh(x) = 1 - 2 / (e^(2x) + 1): saturates without NaN
            acc = cap_out * (1.0 - 2.0 / (tl.exp2(acc * (cap_in * 2.8853900817779268)) + 1.0))
        z = tl.where(v_ok[None, :], acc, float("-inf"))
        # -- top-1 (first index on ties) and the target's rank --
        cmax = tl.max(z, 1)
        carg = tl.argmax(z, 1, tie_break_left=True)
        take = cmax > best
        best = tl.where(take, cmax, best)
        best_id = tl.where(take, v0 + carg.to(tl.int64), best_id)
        gt = (z > zt[:, None]) & (offs_v[None, :] != tgt[:, None])
        above += tl.sum(gt.to(tl.int32), 1)
        # -- update m_i, z_i, a_i --
        m_new = tl.maximum(m_i, cmax)
        alpha = tl.exp(m_i - m_new)
        shift = tl.where(m_i == float("-inf"), 0.0, m_i - m_new)
        d = tl.where(v_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(v_ok[None, :], tl.exp(d), 0.0)
        a_i = alpha * (a_i + shift * z_i) + tl.sum(e * d, 1)
        z_i = alpha * z_i + tl.sum(e, 1)
        m_i = m_new
    tl.store(M + offs_t, m_i, mask=t_ok)
    tl.store(ZS + offs_t, z_i, mask=t_ok)
    tl.store(A + offs_t, a_i, mask=t_ok)
    tl.store(BEST + offs_t, best, mask=t_ok)
    tl.store(BEST_ID + offs_t, best_id, mask=t_ok)
    tl.store(ABOVE + offs_t, above, mask=t_ok)


def vocab_stats_triton(
    h: torch.Tensor,  # [T, d]
    weight: torch.Tensor,  # [V, d]
    target: torch.Tensor,  # [T] int64, -1: none
    bias: torch.Tensor | None = None,  # [V]
    softcap: float | None = None,
    block_t: int = 64,
    block_v: int = 64,
    block_d: int = 64,
    num_warps: int = 8,  # 4 spill on sm_90 (255 registers, ~240 spill stores); 8: 216 registers, none
) -> dict[str, torch.Tensor]:
    """Outputs as ``reference.vocab_stats_ref`` (logits accumulated in float32; ``softcap``: the final logit
    softcapping); CUDA tensors, or the CPU under ``TRITON_INTERPRET=1``."""
    if not (h.is_cuda or is_interpreter()):
        raise ValueError("vocab_stats_triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
    check_interpreter()
    validate_vocab_inputs(h, weight, target, bias)
    if h.dtype != weight.dtype or h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"h and weight must share a dtype among float16, bfloat16, float32; got {h.dtype}, {weight.dtype}"
        )
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    T, D = h.shape
    V = weight.shape[0]
    dev = h.device
    target = target.to(device=dev, dtype=torch.int64).contiguous()
    z_t = target_logits(h, weight, target, bias, softcap).contiguous()  # [T]
    m, zs, a, best = (torch.empty(T, device=dev, dtype=torch.float32) for _ in range(4))
    best_id = torch.empty(T, device=dev, dtype=torch.int64)
    above = torch.empty(T, device=dev, dtype=torch.int32)
    upcast = h.dtype == torch.bfloat16 and is_interpreter()
    grid = (triton.cdiv(T, block_t),)
    _vocab_stats_online_kernel[grid](
        m,
        zs,
        a,
        best,
        best_id,
        above,
        h,
        h.stride(0),
        weight,
        weight.stride(0),
        bias if bias is not None else z_t,
        target,
        z_t,
        T,
        V,
        D,
        1.0 / softcap if softcap else 1.0,
        float(softcap or 1.0),
        HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None,
        IEEE=h.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        BLOCK_T=block_t,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return finish(m, zs, a, best, best_id, above, z_t, target)
