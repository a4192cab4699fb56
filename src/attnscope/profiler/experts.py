"""The neurons of mixture-of-experts blocks: expert e's neuron n is what e's down projection reads, and it fires only
on the tokens the router sends to e. Its statistics are over those tokens: the largest activation and its token, the
sum and sum of squares (a mean over ``mlp.expert_tokens``), the top-k contexts (FFN memories per expert neuron).

Per token, an MoE layer's neuron space is the concatenation of its experts' neurons (E x F_expert, expert e's
neuron n numbered e * F_expert + n), of which the token's k chosen experts are active: ``in_norm`` is the norm of
those k x F_expert activations, ``topk_idx``/``topk_val`` their largest (as a dense layer's over its d_ff).
"""

from __future__ import annotations

import numpy as np
import torch

from attnscope.kernels.stats import (
    EXPERT_CTX_VALUE,
    EXPERT_NEURON_MAX,
    EXPERT_NEURON_SUM,
    EXPERT_NEURON_SUMSQ,
)

from .accum import Accumulator
from .memories import top_contexts

__all__ = ["expert_neuron_stats", "fold_expert_neurons", "expert_token_stats"]


def expert_token_stats(idx: torch.Tensor, acts: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Per token of an MoE layer (idx [T, k] its experts, acts [T, k, Fe] their activations): ``in_norm`` [T], and
    ``topk_idx`` [T, top_k] int32 / ``topk_val`` [T, top_k] its largest activations, neuron e * Fe + n."""
    T, k, Fe = acts.shape
    flat = acts.reshape(T, k * Fe).float()
    kk = min(top_k, k * Fe)
    val, pos = flat.topk(kk, dim=1)
    neuron = idx.long().gather(1, torch.div(pos, Fe, rounding_mode="floor")) * Fe + pos % Fe
    out_idx = torch.full((T, top_k), -1, dtype=torch.int32, device=acts.device)
    out_val = torch.full((T, top_k), float("nan"), device=acts.device)
    out_idx[:, :kk], out_val[:, :kk] = neuron.to(torch.int32), val
    return {"in_norm": torch.linalg.vector_norm(flat, dim=1), "topk_idx": out_idx, "topk_val": out_val}


def expert_neuron_stats(idx: torch.Tensor, acts: torch.Tensor, n_experts: int, contexts: int) -> dict[str, np.ndarray]:
    """One batch's statistics of every expert neuron over the tokens routed to its expert (idx [T, k] the experts of
    each real token, acts [T, k, Fe] their activations): ``max`` [E, Fe] float32 with ``argmax`` (the token's row;
    -inf / 0 for an expert no token chose), ``sum`` and ``sumsq`` [E, Fe] float64, and with ``contexts`` > 0
    ``ctx_value`` / ``ctx_index`` [E, contexts, Fe], each neuron's largest activations and their rows (-inf / -1
    past the expert's tokens). Ties go to the earlier row, as everywhere a maximum over tokens is kept."""
    T, k, Fe = acts.shape
    E = n_experts
    out = {
        "max": np.full((E, Fe), -np.inf, np.float32),
        "argmax": np.zeros((E, Fe), np.int64),
        "sum": np.zeros((E, Fe)),
        "sumsq": np.zeros((E, Fe)),
    }
    if contexts:
        out["ctx_value"] = np.full((E, contexts, Fe), -np.inf, np.float32)
        out["ctx_index"] = np.full((E, contexts, Fe), -1, np.int64)
    for e in torch.unique(idx).tolist():
        if not 0 <= e < E:
            continue
        tok, slot = torch.where(idx == e)  # tokens in order: a token chooses an expert at most once
        a = acts[tok, slot].float()  # [n_e, Fe]
        mx, arg = a.max(0)  # the first maximal row
        rows = tok.cpu().numpy()
        out["max"][e], out["argmax"][e] = mx.cpu().numpy(), rows[arg.cpu().numpy()]
        a64 = a.double()
        out["sum"][e] = a64.sum(0).cpu().numpy()
        out["sumsq"][e] = (a64 * a64).sum(0).cpu().numpy()
        if contexts:
            v, i = top_contexts(a, contexts)  # [min(contexts, n_e), Fe]
            out["ctx_value"][e, : len(v)] = v.cpu().numpy()
            out["ctx_index"][e, : len(v)] = rows[i.cpu().numpy()]
    return out


def fold_expert_neurons(acc: Accumulator, dims: dict, layer: int, st: dict[str, np.ndarray], where: np.ndarray):
    """Fold one batch's ``expert_neuron_stats`` of ``layer`` into ``acc`` (``where``: batch row -> run token)."""
    E, Fe = st["max"].shape
    dims = dims | {"Fe": Fe, "k": st["ctx_value"].shape[1] if "ctx_value" in st else 1}
    acc.allocate(dims, EXPERT_NEURON_MAX, EXPERT_NEURON_SUM, EXPERT_NEURON_SUMSQ)
    acc.fold(EXPERT_NEURON_MAX, st["max"], where[st["argmax"]], at=layer)
    acc.fold(EXPERT_NEURON_SUM, st["sum"], at=layer)
    acc.fold(EXPERT_NEURON_SUMSQ, st["sumsq"], at=layer)
    if "ctx_value" in st:
        acc.allocate(dims, EXPERT_CTX_VALUE)
        ci = st["ctx_index"]
        acc.fold(EXPERT_CTX_VALUE, st["ctx_value"], np.where(ci >= 0, where[np.maximum(ci, 0)], -1), at=layer)
