"""Tables derived from a ``Profile``: per-head summaries and per-token rows (numpy only)."""

from __future__ import annotations

import numpy as np

from attnscope.kernels.stats import DIST, FINAL, HEAD_SUMMARY, RECV_MAX, RECV_SUM, full_key, thumb_key
from attnscope.profiler.data import mean_distance

__all__ = [
    "HEAD_COLUMNS",
    "ViewError",
    "TOKEN_COLUMNS",
    "attention_matrix",
    "down_proj_by_position",
    "check_layer_head",
    "head_summary",
    "high_entropy_positions",
    "received",
    "token_labels",
    "token_table",
]

# column -> what it means: the per-head summary of ``stats.HEAD_SUMMARY``, in the order tables show it
HEAD_COLUMNS = {col: label for col, (_, label) in HEAD_SUMMARY.items()}

TOKEN_COLUMNS = ("prompt", "position", "token_id", "token", "logit_entropy")


class ViewError(ValueError):
    """A view was asked for something the profile does not hold (index out of range, a matrix not kept)."""


def check_layer_head(prof, layer: int, head: int | None = None) -> None:
    """``ViewError`` naming the valid range when a layer or head index is out of range."""
    if not 0 <= layer < prof.n_layers:
        raise ViewError(f"layer {layer} is out of range: the profile has layers 0..{prof.n_layers - 1}")
    if head is not None and not 0 <= head < prof.n_heads:
        raise ViewError(f"head {head} is out of range: the profile has heads 0..{prof.n_heads - 1}")


def head_summary(prof) -> dict[str, np.ndarray]:
    """Per (layer, head) summary statistics over every token of the profile, each [layers, heads] (from the additive
    row sums and distance buckets: a corpus run without per-token vectors has them too)."""
    m = prof.head_means()
    out = {}
    for col, (stat, _) in HEAD_SUMMARY.items():
        if stat is DIST:  # [Ly, H] from the [Ly, H, N_DIST_BUCKETS] buckets
            out[col] = mean_distance(prof.arrays[DIST.key])
        elif stat.name in m:
            out[col] = m[stat.name]
        else:  # a vector newer than the profile (learned_sink: no model profiled before it had learned sinks)
            out[col] = np.zeros((prof.n_layers, prof.n_heads))
    return {name: np.asarray(v, dtype=np.float64) for name, v in out.items()}


def token_labels(prof, prompt: int) -> list[str]:
    """The decoded tokens of one prompt, as stored in the profile."""
    sl = prof.prompt_slice(prompt)  # range check
    return list(prof.prompts[prompt].get("tokens") or [str(t) for t in prof.arrays["tokens.ids"][sl]])


def high_entropy_positions(prof, prompt: int, top: int = 5) -> np.ndarray:
    """Positions (within the prompt) of the ``top`` highest next-token entropies, highest first."""
    ent = prof.arrays["tokens.logit_entropy"][prof.prompt_slice(prompt)]
    order = np.argsort(-ent, kind="stable")
    return order[: min(top, ent.size)]


def attention_matrix(prof, prompt: int, layer: int, head: int | None) -> tuple[np.ndarray, bool, int]:
    """The attention of one head (or the mean of all heads) of one prompt.

    Returns ``(matrix, is_full, length)``: the kept full L x L matrix when the user kept it (all heads kept
    for a mean), else the pooled R x R thumbnail; ``length`` is the prompt's token count, so a thumbnail's
    cells map back to token positions.
    """
    check_layer_head(prof, layer, head)
    sl = prof.prompt_slice(prompt)
    L = sl.stop - sl.start
    heads = range(prof.n_heads) if head is None else [head]
    names = [full_key(prompt, layer, h) for h in heads]
    if all(n in prof.arrays for n in names):
        return np.mean([prof.arrays[n] for n in names], axis=0), True, L
    thumb = prof.arrays[thumb_key(prompt)][layer]  # [H, R, R]
    return (thumb.mean(0) if head is None else thumb[head]), False, L


def received(prof, prompt: int, layer: int, head: int, mode: str = "mean", token: int | None = None) -> np.ndarray:
    """Attention per key position of one prompt.

    ``mode``: ``"mean"`` (attention received, averaged over the queries that can see the key), ``"max"``
    (largest weight any query gives it), or ``"token"`` (the row of query ``token``: the final token's row is
    always kept; other rows need the head's full matrix, kept with ``--keep-head LAYER:HEAD``).
    """
    check_layer_head(prof, layer, head)
    sl = prof.prompt_slice(prompt)
    L = sl.stop - sl.start
    if mode == "mean":
        n_queries = L - np.arange(L)  # causal: queries j..L-1 see key j
        return prof.arrays[RECV_SUM.key][layer, head, sl] / n_queries
    if mode == "max":
        return prof.arrays[RECV_MAX.key][layer, head, sl]
    if mode == "token":
        t = L - 1 if token is None else (token + L if token < 0 else token)
        if not 0 <= t < L:
            raise ViewError(f"token {token} is out of range: prompt {prompt} has {L} tokens")
        if t == L - 1:
            return prof.arrays[FINAL.key][layer, head, sl]
        name = full_key(prompt, layer, head)
        if name not in prof.arrays:
            raise ViewError(
                f"the row of token {t} needs the full matrix of layer {layer} head {head}, which this profile did "
                f"not keep: profile again with --keep-head {layer}:{head} (or use the final token, mean or max)"
            )
        return prof.arrays[name][t, :L]
    raise ValueError(f"mode must be 'mean', 'max' or 'token', got {mode!r}")


def token_table(prof) -> dict[str, np.ndarray]:
    """One row per token of every prompt: prompt, position, token id and text, next-token entropy, and per layer
    the down_proj input/output norms (``mlp_in_norm_l{L}``, ``mlp_out_norm_l{L}``)."""
    off = prof.offsets
    n = prof.n_tokens
    prompt = np.repeat(np.arange(len(off) - 1), np.diff(off))
    position = np.arange(n) - off[prompt]
    tokens = [t for p in prof.prompts for t in (p.get("tokens") or [])]
    out: dict[str, np.ndarray] = {
        "prompt": prompt,
        "position": position,
        "token_id": prof.arrays["tokens.ids"],
        "token": np.array(tokens if len(tokens) == n else [""] * n, dtype=object),
        "logit_entropy": prof.arrays["tokens.logit_entropy"],
    }
    for layer in range(prof.n_layers):
        out[f"mlp_in_norm_l{layer}"] = prof.arrays["mlp.in_norm"][layer]
        out[f"mlp_out_norm_l{layer}"] = prof.arrays["mlp.out_norm"][layer]
    return out


def down_proj_by_position(prof, which: str = "in", bins: int = 50) -> np.ndarray:
    """Mean down_proj norm per (layer, relative position bin) over every prompt: [layers, bins].

    Positions are scaled to [0, 1) by each prompt's length, so prompt sets of different lengths compare.
    """
    norms = prof.arrays[f"mlp.{which}_norm"]  # [layers, tokens]
    off = prof.offsets
    lengths = np.diff(off)
    prompt = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(prof.n_tokens) - off[prompt]  # [tokens]
    b = np.minimum(pos * bins // lengths[prompt], bins - 1)  # integer arithmetic: no bin lost to rounding
    total = np.zeros((norms.shape[0], bins))
    np.add.at(total.T, b, norms.T)
    count = np.bincount(b, minlength=bins)
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
