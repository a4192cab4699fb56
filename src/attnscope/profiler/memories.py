"""FFN key-value memories (Geva et al. 2021, 2022): what makes each MLP neuron fire, and what it writes.

A neuron n of layer l reads the residual stream through its key and writes ``W_out[:, n]`` (a column of the
down-projection) scaled by its activation x_n. Two things describe it as a rule "context -> tokens":

- its trigger contexts: the tokens of a corpus where x_n is largest, kept as a mergeable running top-k
  (``NeuronTopK``: merging two runs equals one run over both corpora);
- the tokens it promotes: ``W_U (g * W_out[:, n])`` through the unembedding (g the final norm's gain, the
  direction the written vector takes in the logits), top-k over the vocabulary. This depends on the weights
  alone: computed once per model a chunk of neurons at a time and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .blocks import decoder_layers, expert_write_out, mlp_blocks, write_out_weight
from .data import topk_fold
from .hooks import down_proj_modules
from .lens import lens_modules

__all__ = ["NeuronTopK", "promoted_tokens", "top_contexts", "write_out_matrix"]


def top_contexts(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest activations of each neuron over the rows (tokens) of ``x`` [T, d_ff] and their rows,
    float32 [k, d_ff] and int64 [k, d_ff], ties at the k-th value going to the earliest rows.

    ``torch.topk`` leaves the choice among equal values open (it varies with the thread count), and ties are
    common: every prompt that begins with the same token (a BOS) has the same activations there. A column whose
    k-th value is shared past k is re-selected with a stable sort, so the result never depends on the machine.
    """
    k = min(k, x.shape[0])
    x = x.float()
    val, idx = x.topk(k, dim=0)
    if k == 0:
        return val, idx
    ties = (x >= val[-1]).sum(0) > k  # columns where more rows than k reach the k-th value
    if bool(ties.any()):
        cols = ties.nonzero().squeeze(1)
        v, i = torch.sort(x[:, cols], dim=0, descending=True, stable=True)
        val[:, cols], idx[:, cols] = v[:k], i[:k]
    return val, idx


@dataclass
class NeuronTopK:
    """Running top-k activations of every neuron of every layer over the tokens seen so far.

    Attributes:
        value: [layers, k, d_ff] float32, largest first (-inf where fewer than k tokens were seen).
        token: [layers, k, d_ff] int64 global index of the token holding each value (-1 where none).
    """

    value: np.ndarray
    token: np.ndarray

    @classmethod
    def empty(cls, n_layers: int, d_ff: int, k: int = 16) -> NeuronTopK:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return cls(np.full((n_layers, k, d_ff), -np.inf, np.float32), np.full((n_layers, k, d_ff), -1, np.int64))

    @property
    def k(self) -> int:
        return self.value.shape[1]

    def update(self, layer: int, x: torch.Tensor, first_token: int) -> None:
        """Fold in activations x [T, d_ff] of the tokens ``first_token .. first_token + T - 1``."""
        if x.ndim != 2 or x.shape[1] != self.value.shape[2]:
            raise ValueError(f"x must be [tokens, {self.value.shape[2]}], got {tuple(x.shape)}")
        val, idx = top_contexts(x.detach(), self.k)  # [k, d_ff]
        self._fold(layer, val.cpu().numpy(), idx.cpu().numpy() + first_token)

    def _fold(self, layer: int, val: np.ndarray, tok: np.ndarray) -> None:
        self.value[layer], self.token[layer] = topk_fold(self.value[layer], self.token[layer], val, tok)

    def merge(self, other: NeuronTopK, token_offset: int) -> NeuronTopK:
        """The top-k over both token sets; ``other``'s token indices are shifted by ``token_offset``."""
        if other.value.shape != self.value.shape:
            raise ValueError(f"cannot merge top-k of shapes {self.value.shape} and {other.value.shape}")
        out = NeuronTopK(self.value.copy(), self.token.copy())
        shifted = np.where(other.token >= 0, other.token + token_offset, -1)
        for layer in range(self.value.shape[0]):
            out._fold(layer, other.value[layer], shifted[layer])
        return out


def write_out_matrix(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """W_out of one layer as [d_model, d_ff]: column n is what neuron n adds to the residual stream."""
    return write_out_weight(down_proj_modules(model)[layer])


def _norm_gain(norm: torch.nn.Module, d: int, like: torch.Tensor) -> torch.Tensor | None:
    """The final norm's per-channel gain g as the module applies it (Gemma's ``1 + weight``, a LayerNorm's weight):
    (norm(v) - norm(-v)) / 2v for v = +-1 alternating (unit RMS, zero mean for even d; a bias cancels)."""
    if norm is None:
        return None
    v = torch.ones(d, dtype=like.dtype, device=like.device)
    v[1::2] = -1
    with torch.no_grad():
        return ((norm(v[None]) - norm(-v[None]))[0] / (2 * v)).float()


def _top_promoted(w_u: torch.Tensor, w_out: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k vocabulary entries of W_U w for each column w of w_out [d, F]: tokens [F, k] and logits [F, k]."""
    tok_l, val_l = [], []
    for n0 in range(0, w_out.shape[1], chunk):
        contrib = w_u @ w_out[:, n0 : n0 + chunk]  # [V, chunk]
        val, idx = contrib.topk(min(k, contrib.shape[0]), dim=0)  # [k, chunk]
        tok_l.append(idx.T)
        val_l.append(val.T)
    return torch.cat(tok_l), torch.cat(val_l)


def promoted_tokens(
    model: torch.nn.Module,
    k: int = 10,
    chunk: int = 256,
    cache: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """The k tokens each neuron's output vector promotes most, for every layer.

    Returns ``{"token": [layers, d_ff, k] int64, "logit": [layers, d_ff, k] float32}``: the logit contribution per
    unit of activation, largest first (-1 / NaN for layers without a dense MLP, e.g. mixture-of-experts layers,
    and past a narrower layer's d_ff); for a model with mixture-of-experts blocks also ``"expert_token"`` /
    ``"expert_logit"`` [layers, E, F_expert, k], of each routed expert's neurons (per unit of activation, before
    the routing weight; -1 / NaN on dense layers). The direction through the final norm is its gain as the module
    applies it (``_norm_gain``). Memory O(vocab x chunk); with ``cache`` (a file path) the result is read from
    there when present and written there otherwise.
    """
    if cache is not None and Path(cache).is_file():
        from safetensors.numpy import load_file

        got = load_file(str(cache))
        if got["token"].shape[-1] == k:
            return got
    _, norm, head = lens_modules(model)
    w_u = head.weight.detach().float()  # [V, d]
    gain = _norm_gain(norm, w_u.shape[1], head.weight)
    scale = (lambda w: w * gain[:, None]) if gain is not None else (lambda w: w)  # noqa: E731
    Ly = len(decoder_layers(model))
    kk = min(k, w_u.shape[0])
    tokens, logits, experts = {}, {}, {}
    with torch.no_grad():
        for layer in sorted(down_proj_modules(model)):
            tokens[layer], logits[layer] = _top_promoted(w_u, scale(write_out_matrix(model, layer).float()), k, chunk)
        for layer, block in mlp_blocks(model).items():
            if block.kind == "moe" and getattr(block.experts, "down_proj", None) is not None:
                E = block.experts.down_proj.shape[0]
                experts[layer] = [
                    _top_promoted(w_u, scale(expert_write_out(block.experts, e).float()), k, chunk) for e in range(E)
                ]
    F = max((t.shape[0] for t in tokens.values()), default=0)
    out = {"token": np.full((Ly, F, kk), -1, np.int64), "logit": np.full((Ly, F, kk), np.nan, np.float32)}
    for layer, t in tokens.items():
        out["token"][layer, : t.shape[0]] = t.cpu().numpy()
        out["logit"][layer, : t.shape[0]] = logits[layer].cpu().numpy()
    if experts:
        E, Fe = len(next(iter(experts.values()))), next(iter(experts.values()))[0][0].shape[0]
        out["expert_token"] = np.full((Ly, E, Fe, kk), -1, np.int64)
        out["expert_logit"] = np.full((Ly, E, Fe, kk), np.nan, np.float32)
        for layer, per_expert in experts.items():
            for e, (t, v) in enumerate(per_expert):
                out["expert_token"][layer, e], out["expert_logit"][layer, e] = t.cpu().numpy(), v.cpu().numpy()
    if cache is not None:
        from safetensors.numpy import save_file

        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache) + ".tmp")
        save_file(out, str(tmp))
        tmp.replace(cache)
    return out
