"""Choose the implementation of each statistic: Triton on CUDA, torch on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ._cpu_fused import HAS_NUMBA
from .contract import AttnStatsSpec, KeyRanges, ScoreMod, Spans, validate_lse
from .reference import down_proj_stats_ref
from .torch_path import attn_stats_torch

__all__ = ["Impl", "attn_stats", "down_proj_stats"]

Impl = Literal["auto", "torch", "triton"]


def _resolve(impl: Impl, device: torch.device) -> str:
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_ok() else "torch"
    return impl


def _triton_ok() -> bool:
    try:
        from . import qk_stats  # noqa: F401
    except ImportError:
        return False
    return True


def attn_stats(
    q: torch.Tensor,  # [B, H, L, D]
    k: torch.Tensor,  # [B, H_kv, L, D]
    scaling: float,
    ranges: KeyRanges,
    spec: AttnStatsSpec = AttnStatsSpec(),
    impl: Impl = "auto",
    block_q: int = 128,
    tokens: torch.Tensor | None = None,  # [B, L] token ids for the duplicate/induction masses
    lse: torch.Tensor | None = None,  # [B, H, L] float32 log-sum-exp of each row, from the forward attention
    softcap: float | None = None,  # the model's attention-logit softcapping: s -> softcap * tanh(s / softcap)
    sinks: torch.Tensor | None = None,  # [H] the model's learned sink logits (in the softmax's denominator)
    spans: Sequence[Spans | None] | None = None,  # per batch row its named spans (``contract.validate_spans``)
) -> dict[str, torch.Tensor]:
    """Every attention statistic of the contract for one layer (outputs as ``reference.attn_stats_ref``).

    ``block_q`` is the query block of the torch path (its memory is O(B * H * block_q * L)); the Triton
    kernels choose their own tiles. Without ``tokens`` no token repeats, so ``dup`` and ``induction`` are zero.
    ``lse`` (natural log, over each row's allowed keys; rows with none ignore it) lets the statistics skip their
    own log-sum-exp pass; without it they compute it. With ``softcap`` or ``sinks`` an ``lse`` must be that of the
    capped logits with the sink's term (a fused SDPA kernel's is not).
    """
    lse = validate_lse(lse, q)
    mod = ScoreMod(softcap, sinks)
    if _resolve(impl, q.device) == "triton":
        from .qk_stats import qk_stats

        return qk_stats(q, k, scaling, ranges, spec, tokens=tokens, lse=lse, mod=mod, spans=spans)
    return attn_stats_torch(q, k, scaling, ranges, spec, block_q=block_q, tokens=tokens, lse=lse, mod=mod, spans=spans)


def down_proj_stats(
    x: torch.Tensor,  # [T, d_ff]
    y: torch.Tensor,  # [T, d_model]
    top_k: int = 8,
    impl: Impl = "auto",
    contexts: int = 0,
) -> dict[str, torch.Tensor]:
    """Down-projection statistics of T tokens (outputs as ``reference.down_proj_stats_ref``).

    On the CPU with Numba, ``contexts`` > 0 also returns ``ctx_value``/``ctx_index`` [min(contexts, T), d_ff], each
    neuron's largest activations and their rows (ties to the earlier row); other paths leave them to the caller.
    """
    if _resolve(impl, x.device) == "triton":
        from .down_proj import down_proj_stats_triton

        return down_proj_stats_triton(x, y, top_k)
    if HAS_NUMBA and x.device.type == "cpu":
        from ._cpu_down_proj import down_proj_stats_numba

        return down_proj_stats_numba(x, y, top_k, contexts)
    return down_proj_stats_ref(x, y, top_k, upcast=False)
