"""The next-token distribution of many rows reduced over the vocabulary a chunk at a time (the CPU path).

For hidden rows h [T, d] and an unembedding W [V, d], the logits z = h W^T (+ b) are [T, V]: for a 49k-token
vocabulary and 8k tokens that is 1.6 GB per layer. This path never holds more than [T, chunk] of them and keeps,
per row, an online softmax (running max m, Z = sum exp(z - m), A = sum exp(z - m) (z - m)), the best logit and its
token, and how many logits exceed the target's:

    lse = m + log Z,   H = log Z - A / Z,   p(top) = exp(z_top - lse),   p(target) = exp(z_target - lse)
"""

from __future__ import annotations

import torch

from ._cpu_gemm import linear

__all__ = ["finish", "target_logits", "validate_vocab_inputs", "vocab_stats_torch"]


def validate_vocab_inputs(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """``ValueError`` unless h [T, d], weight [V, d], target [T] integer ids and bias [V] (or None) match."""
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h [T, d] and weight [V, d] do not match: {tuple(h.shape)}, {tuple(weight.shape)}")
    if target.shape != h.shape[:1] or target.dtype.is_floating_point:
        raise ValueError(f"target must be [T] integer token ids (-1: none), got {tuple(target.shape)} {target.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def target_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """z_target [T] float32 (0 where target is -1): one dot product per row (softcapped as the logits are)."""
    t = target.clamp_min(0)
    z = torch.linalg.vecdot(h.float(), weight[t].float())  # [T]
    if bias is not None:
        z = z + bias[t].float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return torch.where(target >= 0, z, 0.0)


def vocab_stats_torch(
    h: torch.Tensor,  # [T, d]
    weight: torch.Tensor,  # [V, d]
    target: torch.Tensor,  # [T] int64, -1: none
    bias: torch.Tensor | None = None,  # [V]
    chunk: int = 2048,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Outputs as ``reference.vocab_stats_ref`` (``softcap``: the final logit softcapping); memory O(T x chunk),
    logits in float32.

    Per chunk of the vocabulary: one matmul, then the logits are reduced in place (max, shift, exp into a reused
    buffer, two row sums); the rank of the target is counted only for rows that have one.
    """
    validate_vocab_inputs(h, weight, target, bias)
    T, V = h.shape[0], weight.shape[0]
    dev = h.device
    hf = h.float()
    z_t = target_logits(h, weight, target, bias, softcap)  # [T]
    ranked = bool((target >= 0).any())
    m = torch.full((T,), float("-inf"), device=dev)
    zs = torch.zeros(T, device=dev)  # sum exp(z - m)
    a = torch.zeros(T, device=dev)  # sum exp(z - m) (z - m)
    best = torch.full((T,), float("-inf"), device=dev)
    best_id = torch.zeros(T, dtype=torch.long, device=dev)
    above = torch.zeros(T, dtype=torch.long, device=dev)
    vocab = torch.arange(V, device=dev)
    ebuf = torch.empty(T * min(chunk, V), device=dev)  # exp of one chunk (reused)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        z = linear(hf, weight[v0:v1].float(), None if bias is None else bias[v0:v1].float())  # [T, Vc]
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        # -- top-1: a strictly larger chunk maximum replaces the earlier one (first index on ties); the argmax only of
        # the rows it replaces (after the first chunks, few: max with indices costs ~15x amax) --
        cmax = z.amax(dim=-1)  # [T]
        take = cmax > best
        if bool(take.all()):
            best_id = z.argmax(dim=-1) + v0
        elif bool(take.any()):
            rows = take.nonzero().squeeze(1)
            best_id[rows] = z.index_select(0, rows).argmax(dim=-1) + v0
        best = torch.where(take, cmax, best)
        # -- rank of the target: logits above it, the target itself excluded --
        if ranked:
            gt = z > z_t[:, None]  # [T, Vc]
            gt &= vocab[None, v0:v1] != target[:, None]
            above += gt.sum(-1)
        # -- online softmax and entropy, the chunk shifted in place: z <- z - m --
        m_new = torch.maximum(m, cmax)
        alpha = torch.exp(m - m_new)  # [T]; exp(-inf) = 0 on the first chunk
        z -= m_new[:, None]
        e = torch.exp(z, out=ebuf[: T * (v1 - v0)].view(T, v1 - v0))  # [T, Vc]
        e_sum = e.sum(-1)
        a = alpha * (a + (m - m_new).nan_to_num(0.0) * zs) + e.mul_(z).sum(-1)  # (a vecdot is ~3x slower)
        zs = alpha * zs + e_sum
        m = m_new
    return finish(m, zs, a, best, best_id, above, z_t, target)


def finish(m, zs, a, best, best_id, above, z_t, target) -> dict[str, torch.Tensor]:
    """The outputs from the per-row online state (max, sum, entropy term, best logit and id, count above target)."""
    lse = m + torch.log(zs)
    has = target >= 0
    return {
        "lse": lse,
        "entropy": torch.log(zs) - a / zs,
        "top_id": best_id,
        "top_prob": torch.exp(best - lse),
        "target_prob": torch.where(has, torch.exp(z_t - lse), 0.0),
        "target_rank": torch.where(has, above.long(), -1),
    }
