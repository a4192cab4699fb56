"""Plain torch references that materialise the attention (small shapes only).

They are written the obvious way, one statistic at a time, so that the blocked torch path and the Triton
kernels are checked against something that shares none of their tricks. Tests, benchmarks and the profiler
import them from here; nothing re-implements them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .contract import (
    AttnStatsSpec,
    KeyRanges,
    Spans,
    linear_bin,
    log_bin,
    resolve_tokens,
    thumb_edges,
)
from .stats import (
    A_LOCAL,
    A_SINK_KEYS,
    ARGMAX,
    ASHAPE,
    DIAG,
    DIST,
    DUP,
    ENTROPY,
    FINAL,
    HIST_ALL,
    HIST_LOG,
    INDUCTION,
    LEARNED_SINK,
    MOMENTS,
    N_DIST_BUCKETS,
    OBS_WINDOW,
    PREV,
    RECV_MAX,
    RECV_SUM,
    ROWMAX,
    SINK,
    SPAN,
    THUMB,
    VECTORS,
    WINDOW_RECV,
)

__all__ = [
    "attention_probs_ref",
    "attn_stats_from_probs_ref",
    "attn_stats_ref",
    "sink_share_ref",
    "down_proj_stats_ref",
    "vocab_stats_ref",
]


def attention_probs_ref(
    q: torch.Tensor,  # [B, H, L, D]
    k: torch.Tensor,  # [B, H_kv, L, D]
    scaling: float,
    ranges: KeyRanges,
    upcast: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [H] learned sink logits
) -> torch.Tensor:
    """The full attention probabilities [B, H, L, L]; rows with no allowed key are all zero. With ``sinks`` each
    row sums to 1 minus its sink's share (``sink_share_ref``)."""
    dt = torch.float64 if upcast else torch.float32
    B, H, L, _ = q.shape
    group = H // k.shape[1]
    kk = k.to(dt).repeat_interleave(group, dim=1)  # [B, H, L, D]
    s = torch.matmul(q.to(dt), kk.transpose(-1, -2)) * scaling  # [B, H, L, L]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = ranges.allowed(L).to(q.device)  # [B, 1, L, L]
    s = s.masked_fill(~allowed, -math.inf)
    if sinks is None:
        p = torch.softmax(s, dim=-1)  # [B, H, L, L]
    else:  # the sink is one more column of the softmax, dropped after it
        col = sinks.to(device=q.device, dtype=dt).view(1, H, 1, 1).expand(B, H, L, 1)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :L]
        p = p * allowed  # a row with no allowed key: 0, not the sink's
    return torch.nan_to_num(p, nan=0.0)  # fully masked rows -> 0


def sink_share_ref(p: torch.Tensor, ranges: KeyRanges, has_sinks: bool) -> torch.Tensor:
    """[B, H, L] the learned sink's share of each row, 1 - sum_j p_ij (0 in rows with no allowed key, and for a
    model without sinks)."""
    B, H, L, _ = p.shape
    if not has_sinks:
        return torch.zeros(B, H, L, dtype=p.dtype)
    rows = torch.arange(L)
    ok = (rows[None, :] >= ranges.start.cpu()[:, None]) & (rows[None, :] < ranges.end.cpu()[:, None])  # [B, L]
    return torch.where(ok[:, None], 1 - p.cpu().sum(-1), 0.0)


def attn_stats_ref(
    q: torch.Tensor,  # [B, H, L, D]
    k: torch.Tensor,  # [B, H_kv, L, D]
    scaling: float,
    ranges: KeyRanges,
    spec: AttnStatsSpec = AttnStatsSpec(),
    upcast: bool = True,
    tokens: torch.Tensor | None = None,  # [B, L] token ids for the head-role masses (None: no repeats)
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [H] learned sink logits
    spans: Sequence[Spans | None] | None = None,  # per batch row its named spans (``contract.validate_spans``)
) -> dict[str, torch.Tensor]:
    """Every attention statistic of the contract, from the materialised probabilities.

    Returns:
        ``hist_all``/``hist_log`` [H, bins] int64, ``moments`` [H, 3] float64 (n pairs, sum p, sum p^2),
        ``dist`` [B, H, 32] float64 (sum of p by floor(log2(i - j + 1))), ``thumb`` [B, H, r, r] with r = min(R, L)
        (average-pooled p; a prompt of n < r tokens fills its first n cells, the rest are zero), and each name of
        ``stats.VECTORS`` as [B, H, L] (keyed by its name); with ``spans``, ``span``: per row [H, Sq, Sk, 2] (mass,
        top1 over ``contract.span_names``) or None.
    """
    p = attention_probs_ref(q, k, scaling, ranges, upcast, softcap, sinks).cpu()  # [B, H, L, L]
    return attn_stats_from_probs_ref(p, ranges, spec, tokens, has_sinks=sinks is not None, spans=spans)


def attn_stats_from_probs_ref(
    p: torch.Tensor,  # [B, H, L, L] attention probabilities (e.g. a model's own output_attentions)
    ranges: KeyRanges,
    spec: AttnStatsSpec = AttnStatsSpec(),
    tokens: torch.Tensor | None = None,  # [B, L] token ids (None: no repeats)
    has_sinks: bool = False,  # the rows sum to 1 - their learned sink's share
    spans: Sequence[Spans | None] | None = None,  # per batch row its named spans (``contract.validate_spans``)
) -> dict[str, torch.Tensor]:
    """The statistics of ``attn_stats_ref`` from already materialised probabilities."""
    B, H, L, _ = p.shape
    p = p.cpu()
    tokens = resolve_tokens(tokens, B, L, torch.device("cpu"))
    allowed = ranges.allowed(L).expand(B, H, L, L)  # [B, H, L, L]
    start, end = ranges.start.tolist(), ranges.end.tolist()
    out: dict[str, torch.Tensor] = {}

    vals = [p[:, h][allowed[:, h]] for h in range(H)]  # per head: the p of every allowed pair
    out[HIST_ALL.name] = torch.stack([torch.bincount(linear_bin(v, spec.bins), minlength=spec.bins) for v in vals])
    out[HIST_LOG.name] = torch.stack(
        [torch.bincount(log_bin(torch.log10(v), spec.bins, spec.log_min), minlength=spec.bins) for v in vals]
    )
    out[MOMENTS.name] = torch.stack(
        [
            torch.stack(
                [torch.tensor(float(v.numel()), dtype=torch.float64), v.double().sum(), (v.double() ** 2).sum()]
            )
            for v in vals
        ]
    )

    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    bucket = torch.floor(torch.log2((i - j + 1).clamp(min=1).double())).long()  # [L, L]
    dist = torch.zeros(B, H, N_DIST_BUCKETS, dtype=torch.float64)
    for h in range(H):
        for b in range(B):
            sel = allowed[b, h]
            dist[b, h].index_add_(0, bucket[sel], p[b, h][sel].double())
    out[DIST.name] = dist

    vec = {s: torch.zeros(B, H, L, dtype=p.dtype) for s in VECTORS}
    logp = torch.where(p > 0, torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    for b in range(B):
        lo, hi = start[b], end[b]
        if hi <= lo:
            continue
        pb = p[b]  # [H, L, L]
        rows = torch.arange(lo, hi)
        vec[DIAG][b, :, lo:hi] = pb[:, rows, rows]
        vec[FINAL][b, :, :hi] = pb[:, hi - 1, :hi]
        vec[ENTROPY][b, :, lo:hi] = -(pb[:, lo:hi] * logp[b][:, lo:hi]).sum(-1)
        vec[ROWMAX][b, :, lo:hi] = pb[:, lo:hi].amax(-1)
        vec[RECV_SUM][b, :, lo:hi] = pb[:, lo:hi, lo:hi].sum(1)
        vec[RECV_MAX][b, :, lo:hi] = pb[:, lo:hi, lo:hi].amax(1)
        vec[WINDOW_RECV][b, :, lo:hi] = pb[:, max(lo, hi - OBS_WINDOW) : hi, lo:hi].sum(1)
        vec[SINK][b, :, lo:hi] = pb[:, lo:hi, lo]
        vec[ARGMAX][b, :, lo:hi] = (pb[:, lo:hi].argmax(-1) - lo).to(p.dtype)  # the first maximum
        if hi - lo > 1:
            vec[PREV][b, :, lo + 1 : hi] = pb[:, rows[1:], rows[1:] - 1]
        # head-role masks [L, L] over (query i, key j), written from their definitions
        t = tokens[b]  # [L]
        earlier = j < i  # [L, L]
        dup = earlier & (t[:, None] == t[None, :])
        t_before = t.roll(1)  # [L] token j - 1 at key j, used only where j - 1 is a real token of this prompt
        has_before = torch.arange(L) >= lo + 1
        ind = earlier & (t[:, None] == t_before[None, :]) & has_before[None, :]
        vec[DUP][b, :, lo:hi] = (pb * dup).sum(-1)[:, lo:hi]
        ashape = (j < lo + A_SINK_KEYS) | (i - j < A_LOCAL)  # [L, L]; p is 0 off the allowed pairs
        vec[ASHAPE][b, :, lo:hi] = (pb * ashape).sum(-1)[:, lo:hi]
        vec[INDUCTION][b, :, lo:hi] = (pb * ind).sum(-1)[:, lo:hi]
    vec[LEARNED_SINK] = sink_share_ref(p, ranges, has_sinks).to(p.dtype)
    out.update({s.name: v for s, v in vec.items()})

    R = spec.thumb_size
    thumb = torch.zeros(B, H, R, R, dtype=p.dtype)
    for b in range(B):
        lo, n = start[b], end[b] - start[b]
        e = thumb_edges(n, R)
        for a in range(len(e) - 1):
            for c in range(len(e) - 1):
                cell = p[b, :, lo + e[a] : lo + e[a + 1], lo + e[c] : lo + e[c + 1]]  # [H, rows, cols]
                thumb[b, :, a, c] = cell.mean(dim=(-1, -2))
    out[THUMB.name] = thumb[:, :, : min(R, L), : min(R, L)].contiguous()
    if spans is not None:
        out[SPAN.name] = [_span_ref(p[b], vec[ARGMAX][b], start[b], end[b], s) for b, s in enumerate(spans)]
    return out


def _span_ref(p: torch.Tensor, argmax: torch.Tensor, lo: int, hi: int, spans: Spans | None) -> torch.Tensor | None:
    """[H, Sq, Sk, 2] mass and top1 of one prompt, from its [H, L, L] probabilities, span by span."""
    if not spans:
        return None
    sets = {name: [lo + t for s, e in pieces for t in range(s, e)] for name, pieces in spans.items()}
    queries = [*sets.values(), [hi - 1]]
    out = torch.zeros(p.shape[0], len(queries), len(sets), 2, dtype=torch.float64)
    for a, rows in enumerate(queries):
        for c, keys in enumerate(sets.values()):
            out[:, a, c, 0] = p[:, rows][:, :, keys].double().sum(-1).mean(-1)
            rel = {t - lo for t in keys}
            am = argmax[:, rows].long()  # [H, rows]
            out[:, a, c, 1] = torch.tensor(
                [[float(int(x) in rel) for x in row] for row in am], dtype=torch.float64
            ).mean(-1)
    return out


def down_proj_stats_ref(
    x: torch.Tensor,  # [T, d_ff] down_proj input (neuron activations)
    y: torch.Tensor,  # [T, d_model] down_proj output
    top_k: int = 8,
    upcast: bool = True,
) -> dict[str, torch.Tensor]:
    """Down-projection statistics of T tokens.

    Returns:
        ``in_norm`` [T], ``out_norm`` [T] (L2 norms), ``topk_idx`` [T, k] int64 and ``topk_val`` [T, k] (neurons
        of largest |x|, signed values), ``neuron_max`` [d_ff] and ``neuron_argmax`` [d_ff] int64 (max of x over tokens
        and the token holding it), ``neuron_sum`` and ``neuron_sumsq`` [d_ff] float64 (summed in the working dtype).

    Ties go to the earlier row (token) and, in a token's top-k, to the lower neuron. The profiler passes a batch's
    tokens in run order, so the earlier row is the lower token index in the run, the rule everywhere.
    """
    dt = torch.float64 if upcast else torch.float32
    xf, yf = x.to(dt), y.to(dt)
    k = min(top_k, x.shape[-1])
    idx = torch.sort(xf.abs(), dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k] ties: lower neuron
    mx, amx = xf.max(dim=0)  # [d_ff] the first row holding the max
    return {
        "in_norm": torch.linalg.vector_norm(xf, dim=-1),
        "out_norm": torch.linalg.vector_norm(yf, dim=-1),
        "topk_idx": idx,
        "topk_val": xf.gather(-1, idx),
        "neuron_max": mx,
        "neuron_argmax": amx,
        "neuron_sum": xf.sum(0).double(),
        "neuron_sumsq": (xf * xf).sum(0).double(),
    }


def vocab_stats_ref(
    h: torch.Tensor,  # [T, d] hidden states after the final norm
    weight: torch.Tensor,  # [V, d] unembedding
    target: torch.Tensor,  # [T] int64 token that comes next (-1: none)
    bias: torch.Tensor | None = None,  # [V]
    upcast: bool = True,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """The next-token distribution softmax(z) of each row, z = h W^T + b (softcap * tanh(z / softcap) with a final
    logit softcapping, as Gemma-2), reduced to a few numbers (the logit lens).

    Returns:
        ``lse`` [T] (log-sum-exp of the logits), ``entropy`` [T] (nats), ``top_id`` [T] int64 and ``top_prob`` [T]
        (the most likely token, the first on ties), ``target_prob`` [T] and ``target_rank`` [T] int64 (how many
        other tokens have a strictly larger logit; 0 and -1 where the target is -1).
    """
    dt = torch.float64 if upcast else torch.float32
    logits = h.to(dt) @ weight.to(dt).T  # [T, V]
    if bias is not None:
        logits = logits + bias.to(dt)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)  # [T, V]
    top_logp, top_id = logp.max(dim=-1)
    has = target >= 0
    t = target.clamp_min(0)
    z_t = logits.gather(-1, t[:, None])  # [T, 1]
    other = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, t[:, None], False)  # [T, V]
    rank = ((logits > z_t) & other).sum(-1)
    return {
        "lse": torch.logsumexp(logits, dim=-1),
        "entropy": -(logp.exp() * logp).sum(-1),
        "top_id": top_id,
        "top_prob": top_logp.exp(),
        "target_prob": torch.where(has, logp.gather(-1, t[:, None]).squeeze(-1).exp(), 0.0),
        "target_rank": torch.where(has, rank, -1),
    }
