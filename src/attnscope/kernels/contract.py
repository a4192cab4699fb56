"""The statistics contract shared by the float64 reference, the torch path and the Triton kernels.

Everything here defines *what* is computed (bin edges, masks, pooling cells, output names and shapes); the
implementations in ``reference.py``, ``torch_path.py`` (with ``_cpu_fused.py``) and ``qk_stats.py`` decide *how*.

For one (batch row b, head h), query i and key j of a padded batch of length L:

    allowed(b, i, j)  <=>  start[b] <= j <= i < end[b]
                           and (window is None or i - j < window)
                           and (chunk is None or (i - start[b]) // chunk == (j - start[b]) // chunk)
    s_ij  = scaling * q_i . k_j,   then s_ij = softcap * tanh(s_ij / softcap) when the model caps its logits
    p_ij  = exp(s_ij - lse_i),  lse_i = log (sum_{allowed j} exp(s_ij) + exp(sink_h))
            (the sink term only for a model with learned sinks: sink_h is head h's extra logit in the softmax's
            denominator, so a row's weights sum to 1 - exp(sink_h - lse_i), its ``learned_sink`` share;
            an implementation may take lse_i [B, H, L] float32 from the forward attention instead of computing it;
            rows with no allowed key ignore it)
    H_i   = -sum_j p_ij log p_ij
    dup_i = sum_{j < i, tok_j = tok_i} p_ij            (duplicate-token mass)
    ind_i = sum_{j < i, tok_{j-1} = tok_i} p_ij        (induction mass; j - 1 must be a real token)

The head-role masses follow TransformerLens ``detect_head`` ("mul" scoring: a head's score is the mean of the
row masses over its rows), except that induction excludes j = i (attending to oneself is not induction).

``start[b]`` is the number of left-padding tokens and ``end[b]`` the end of the real tokens, so right and left
padding are both described by two integers per row; a sliding window or a chunk size is one more integer for the
layer (each row's keys are then [lo_i, i] with lo_i = max(start, i - window + 1, start + (i - start) // chunk *
chunk)): the mask is never materialised as an L x L tensor.
A query with no allowed key (padding) has every statistic equal to zero, never NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .stats import LAST_SPAN, N_DIST_BUCKETS, VECTOR_NAMES, span_names

__all__ = [
    "ATTN_VECTOR_STATS",
    "N_DIST_BUCKETS",
    "AttnStatsSpec",
    "KeyRanges",
    "PLAIN",
    "PoolLayout",
    "Spans",
    "pool_layout",
    "pooled_thumbnail",
    "span_attention",
    "span_names",
    "validate_spans",
    "ScoreMod",
    "linear_bin",
    "log_bin",
    "thumb_edges",
    "previous_tokens",
    "resolve_tokens",
    "thumb_layout",
    "validate_lse",
    "validate_qk",
]

# Per-position vectors every implementation returns, each [batch, heads, L] float32 (zero outside the valid rows),
# in slot order: what each one is lives in ``stats.VECTORS`` (name, formula, fold, label)
ATTN_VECTOR_STATS = VECTOR_NAMES


@dataclass(frozen=True)
class AttnStatsSpec:
    """Resolution of the reduced attention statistics."""

    bins: int = 4096  # linear bins of p on [0, 1] and of log10 p on [log_min, 0]
    log_min: float = -12.0  # lower edge of the log10 histogram; smaller p (and p == 0) land in bin 0
    thumb_size: int = 64  # R: pooled thumbnails are R x R (or L x L when L < R)

    def __post_init__(self) -> None:
        if self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {self.bins}")
        if not self.log_min < 0:
            raise ValueError(f"log_min must be negative, got {self.log_min}")
        if not 1 <= self.thumb_size <= 256:
            raise ValueError(f"thumb_size must lie in [1, 256], got {self.thumb_size}")

    def to_dict(self) -> dict:
        return {"bins": self.bins, "log_min": self.log_min, "thumb_size": self.thumb_size}

    @classmethod
    def from_dict(cls, d: dict) -> AttnStatsSpec:
        return cls(bins=int(d["bins"]), log_min=float(d["log_min"]), thumb_size=int(d["thumb_size"]))


@dataclass(frozen=True)
class KeyRanges:
    """Which keys each query may see, as two integers per batch row plus the layer's window or chunk size.

    Attributes:
        start: [batch] int64, first real token (number of left-padding tokens).
        end: [batch] int64, one past the last real token.
        window: sliding-window size (a query sees itself and the window - 1 keys before it), or None.
        chunk: chunked attention (Llama-4): a query sees the keys of its own chunk of ``chunk`` tokens, counted
            from the first real token, or None.
    """

    start: torch.Tensor
    end: torch.Tensor
    window: int | None = None
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.start.shape != self.end.shape or self.start.ndim != 1:
            raise ValueError(
                f"start and end must be 1-D of equal shape, got {tuple(self.start.shape)}, {tuple(self.end.shape)}"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, got {self.chunk}")
        if self.window is not None and self.chunk is not None:
            raise ValueError("a layer has a sliding window or chunks, not both")

    @property
    def span(self) -> int | None:
        """The most keys any row sees (None: unbounded): a query block of rows [i0, i1) needs keys from
        max(0, i0 - span + 1) only."""
        return self.window if self.window is not None else self.chunk

    def lo(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, len(rows)] int64 first allowed key of each row (``rows`` absolute positions on any device)."""
        st = self.start.to(rows.device)[:, None]  # [B, 1]
        lo = st.expand(-1, rows.numel())
        if self.window is not None:
            lo = torch.maximum(lo, rows[None, :] - self.window + 1)
        if self.chunk is not None:
            rel = (rows[None, :] - st).clamp_min(0)
            lo = torch.maximum(lo, st + rel // self.chunk * self.chunk)
        return lo

    @classmethod
    def full(cls, batch: int, length: int, window: int | None = None) -> KeyRanges:
        """Unpadded batch: every row holds ``length`` real tokens."""
        return cls(torch.zeros(batch, dtype=torch.long), torch.full((batch,), length, dtype=torch.long), window)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, window: int | None = None) -> KeyRanges:
        """From a 2-D [batch, L] 0/1 padding mask whose real tokens are contiguous (left or right padding)."""
        if attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be [batch, L], got shape {tuple(attention_mask.shape)}")
        m = attention_mask.detach().to("cpu", torch.bool)  # [batch, L]
        lengths = m.sum(1)  # [batch]
        pos = torch.arange(m.shape[1])
        first = torch.where(m, pos, m.shape[1]).amin(1)  # [batch]
        first = torch.where(lengths > 0, first, 0)
        contiguous = (m == ((pos >= first[:, None]) & (pos < (first + lengths)[:, None]))).all()
        if not bool(contiguous):
            raise ValueError(
                "attention_mask must mark one contiguous run of real tokens per row (left or right padding)"
            )
        return cls(first.long(), (first + lengths).long(), window)

    def with_window(self, window: int | None, chunk: int | None = None) -> KeyRanges:
        """The same rows with a layer's sliding window and chunk size (each None for none)."""
        return KeyRanges(self.start, self.end, window, chunk)

    def allowed(self, length: int) -> torch.Tensor:
        """The dense [batch, 1, L, L] bool mask (for references and tests only: O(L^2))."""
        i = torch.arange(length)[:, None]  # [L, 1] queries
        j = torch.arange(length)[None, :]  # [1, L] keys
        st = self.start.cpu()[:, None, None, None]
        en = self.end.cpu()[:, None, None, None]
        ok = (j <= i) & (j >= st) & (i < en)  # [batch, 1, L, L]
        if self.window is not None:
            ok = ok & (i - j < self.window)
        if self.chunk is not None:
            ok = ok & (
                (i - st).div(self.chunk, rounding_mode="floor") == (j - st).div(self.chunk, rounding_mode="floor")
            )
        return ok


@dataclass(frozen=True)
class ScoreMod:
    """What a model does to ``scaling * q . k`` beyond the scaling: logit softcapping and learned sinks.

    Attributes:
        softcap: s -> softcap * tanh(s / softcap) before the mask and the softmax (Gemma-2), or None.
        sinks: [H] float, each head's learned sink logit, one more term in the softmax's denominator that no key
            holds (gpt-oss ``sinks``, transformers' ``s_aux``), or None.
    """

    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")
        if self.sinks is not None and (self.sinks.ndim != 1 or not self.sinks.dtype.is_floating_point):
            raise ValueError(f"sinks must be a 1-D float tensor [H], got {tuple(self.sinks.shape)} {self.sinks.dtype}")

    def cap(self, s: torch.Tensor) -> torch.Tensor:
        """The scores as the model's softmax sees them (in place when softcapping)."""
        if self.softcap is None:
            return s
        return s.div_(self.softcap).tanh_().mul_(self.softcap)

    def sink_logits(self, H: int, device, dtype=torch.float32) -> torch.Tensor | None:
        """[H] sink logits on ``device``, or None; ``ValueError`` unless there is one per head."""
        if self.sinks is None:
            return None
        if self.sinks.numel() != H:
            raise ValueError(f"sinks hold {self.sinks.numel()} logits, the attention has {H} heads")
        return self.sinks.detach().to(device=device, dtype=dtype)


PLAIN = ScoreMod()


def linear_bin(p: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of p in ``bins`` equal bins on [0, 1]; p == 1 lands in the last bin."""
    return (p * bins).floor().clamp(0, bins - 1).long()


def log_bin(log10_p: torch.Tensor, bins: int, log_min: float) -> torch.Tensor:
    """Bin of log10 p in ``bins`` equal bins on [log_min, 0]; smaller values (and -inf) land in bin 0."""
    x = (log10_p - log_min) * (bins / -log_min)
    return torch.nan_to_num(x, neginf=0.0).floor().clamp(0, bins - 1).long()


def thumb_edges(length: int, thumb_size: int) -> list[int]:
    """Edges of the pooled-thumbnail cells along one axis of a prompt of ``length`` real tokens.

    Cell t covers relative positions [edges[t], edges[t + 1]); there are min(thumb_size, length) cells, and
    position r lies in cell floor(r * R / length).
    """
    r = min(thumb_size, length)
    return [-(-t * length // r) for t in range(r + 1)] if r > 0 else [0]


def thumb_layout(ranges: KeyRanges, length: int, thumb_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each position of a padded batch falls in its prompt's thumbnail (``thumb_edges`` for every row at once).

    Returns:
        ``edges`` [B, R + 1] int64 absolute cell edges (past the prompt's last cell, repeated),
        ``cell`` [B, L] int64 cell of each position (-1 for padding),
        ``count`` [B, R, R] float64 number of (query, key) pairs pooled into each cell (1 where none, so a
        division by it leaves empty cells at 0).
    """
    lo = ranges.start.cpu().long()  # [B]
    n = (ranges.end.cpu().long() - lo).clamp_min(0)  # [B] real tokens
    r = n.clamp_max(thumb_size)  # [B] cells per axis
    t = torch.arange(thumb_size + 1)  # [R + 1]
    tt = torch.minimum(t[None, :], r[:, None])  # [B, R + 1]; edges past the last cell repeat it
    rel = -(-tt * n[:, None] // r.clamp_min(1)[:, None])  # [B, R + 1] ceil(t * n / r)
    edges = rel + lo[:, None]
    pos = torch.arange(length)[None, :] - lo[:, None]  # [B, L] position relative to the prompt
    real = (pos >= 0) & (pos < n[:, None])
    cell = torch.where(real, pos.clamp_min(0) * r[:, None] // n.clamp_min(1)[:, None], -1)  # floor(rel * r / n)
    sizes = (rel[:, 1:] - rel[:, :-1]).double()  # [B, R]; 0 past the last cell
    count = sizes[:, :, None] * sizes[:, None, :]  # [B, R, R]
    return edges, cell, torch.where(count > 0, count, 1.0)


def validate_qk(q: torch.Tensor, k: torch.Tensor, ranges: KeyRanges) -> None:
    """``ValueError`` unless q [B, H, L, D] and k [B, H_kv, L, D] share B, L, D and a float dtype, H is a multiple of
    H_kv, and ``ranges`` describe B rows."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q [B, H, L, D] and k [B, H_kv, L, D] do not match: {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"heads {q.shape[1]} must be a multiple of H_kv, the KV heads ({k.shape[1]})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}")
    if ranges.start.numel() != q.shape[0]:
        raise ValueError(f"ranges describe {ranges.start.numel()} rows, the batch has {q.shape[0]}")


def validate_lse(lse: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The forward's log-sum-exp as [B, H, L] float32 on q's device, or None; ``ValueError`` on a wrong shape.

    ``lse[b, h, i]`` is the natural-log log-sum-exp of ``scaling * q_i . k_j`` over row i's allowed keys; rows with
    no allowed key may hold anything (inf, NaN): every implementation ignores them.
    """
    if lse is None:
        return None
    B, H, L, _ = q.shape
    if lse.shape != (B, H, L) or not lse.dtype.is_floating_point:
        raise ValueError(f"lse must be a float tensor of shape [{B}, {H}, {L}], got {tuple(lse.shape)} {lse.dtype}")
    return lse.to(device=q.device, dtype=torch.float32)


def resolve_tokens(tokens: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The [batch, L] int64 token ids of the head-role masses; None stands for positions (no token repeats, so the
    duplicate and induction masses are zero)."""
    if tokens is None:
        return torch.arange(length, device=device).expand(batch, length)
    if tokens.shape != (batch, length) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be integer ids of shape [{batch}, {length}], got {tuple(tokens.shape)} {tokens.dtype}"
        )
    return tokens.to(device=device, dtype=torch.long)


def previous_tokens(tokens: torch.Tensor, ranges: KeyRanges) -> torch.Tensor:
    """[B, L] token j - 1 at key j, or -1 where j - 1 is not a real token (ids are >= 0: -1 matches nothing)."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    return torch.where(pos[None, :] > ranges.start.to(tokens.device)[:, None], tokens.roll(1, dims=1), -1)


# -- span attention: the prompt's named spans cut it into cells, pooled like the thumbnail's --
Spans = Mapping[str, Sequence[tuple[int, int]]]  # name -> pieces [s, e) of token positions within the prompt


@dataclass(frozen=True)
class PoolLayout:
    """The cells an implementation pools p into: the thumbnail's uniform cells, cut further at every boundary of
    the prompt's named spans and before its final row (so each named span, ``last`` and each thumbnail cell is a
    union of pooled cells). With no spans it is the thumbnail's own layout.

    Attributes:
        edges: [B, P + 1] int64 absolute cell edges (past the prompt's last cell, repeated).
        cell: [B, L] int64 pooled cell of each position (-1 for padding).
        P: cells a side of the pooled buffer [B, H, P, P] (the most of any row).
        thumb_of: [B, P] int64 thumbnail cell of each pooled cell (its first position's; -1 past the last).
        thumb_count: [B, r, r] float64 pairs in each thumbnail cell (1 where none), r = min(R, L).
        spans: per batch row its named spans (``Spans``), or None when no row has any.
    """

    edges: torch.Tensor
    cell: torch.Tensor
    P: int
    thumb_of: torch.Tensor
    thumb_count: torch.Tensor
    spans: tuple[Spans | None, ...] | None = None


def validate_spans(spans: Spans, n: int, where: str = "the prompt") -> dict[str, tuple[tuple[int, int], ...]]:
    """Named spans as sorted, merged token pieces within [0, n); ``ValueError`` naming ``where`` on an empty span,
    a piece outside the prompt, or the reserved name ``last``."""
    out = {}
    for name, pieces in spans.items():
        if not isinstance(name, str) or not name or name == LAST_SPAN:
            raise ValueError(f"{where}: span name {name!r} is not allowed (a non-empty string other than 'last')")
        ps = sorted((int(s), int(e)) for s, e in pieces)
        merged: list[tuple[int, int]] = []
        for s, e in ps:
            if not 0 <= s < e <= n:
                raise ValueError(f"{where}: span {name!r} piece [{s}, {e}) lies outside its {n} tokens or is empty")
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        if not merged:
            raise ValueError(f"{where}: span {name!r} covers no token")
        out[name] = tuple(merged)
    return out


def pool_layout(
    ranges: KeyRanges, length: int, thumb_size: int, spans: Sequence[Spans | None] | None = None
) -> PoolLayout:
    """The ``PoolLayout`` of a padded batch: ``thumb_layout``'s cells, cut at the spans' piece boundaries (positions
    within each prompt, as ``validate_spans`` returns them) and before each prompt's final row."""
    edges, cell, count = thumb_layout(ranges, length, thumb_size)
    r = min(thumb_size, length)
    B = edges.shape[0]
    if spans is None or all(not s for s in spans):
        thumb_of = torch.arange(thumb_size).expand(B, -1).clone()
        return PoolLayout(edges, cell, thumb_size, thumb_of, count[:, :r, :r], None)
    if len(spans) != B:
        raise ValueError(f"spans describe {len(spans)} rows, the batch has {B}")
    lo = ranges.start.cpu().long()
    n = (ranges.end.cpu().long() - lo).clamp_min(0)
    rows_edges = []
    for b in range(B):
        cut = set(edges[b].tolist())
        if n[b] > 0:
            cut.add(int(lo[b] + n[b] - 1))
        for pieces in (spans[b] or {}).values():
            for s, e in pieces:
                cut.update((int(lo[b]) + s, int(lo[b]) + e))
        rows_edges.append(sorted(cut))
    P = max(len(e) - 1 for e in rows_edges)
    new_edges = torch.tensor([e + [e[-1]] * (P + 1 - len(e)) for e in rows_edges], dtype=torch.long)  # [B, P + 1]
    pos = torch.arange(length)[None, :].expand(B, -1)
    new_cell = torch.searchsorted(new_edges.contiguous(), pos.contiguous(), right=True) - 1  # [B, L]
    new_cell = torch.where(cell >= 0, new_cell, -1)
    first = new_edges[:, :-1]  # [B, P] first position of each pooled cell
    th = cell.gather(1, first.clamp(0, length - 1))  # the thumbnail cell holding it
    real = new_edges[:, 1:] > first
    thumb_of = torch.where(real, th, -1)
    return PoolLayout(new_edges, new_cell, P, thumb_of, count[:, :r, :r], tuple(spans))


def pooled_thumbnail(sums: torch.Tensor, layout: PoolLayout) -> torch.Tensor:
    """[B, H, r, r] float32 thumbnails (mean p per cell) from the pooled sums [B, H, P, P] float64."""
    B, H = sums.shape[:2]
    r = layout.thumb_count.shape[-1]
    sums = sums.double().cpu()
    if layout.spans is None:
        t = sums[:, :, :r, :r]
    else:
        t = torch.zeros(B, H, r * r, dtype=torch.float64)
        th = layout.thumb_of.clamp_min(0)
        idx = (th[:, :, None] * r + th[:, None, :]).view(B, 1, -1).expand(B, H, -1)  # [B, H, P * P]
        ok = ((layout.thumb_of[:, :, None] >= 0) & (layout.thumb_of[:, None, :] >= 0)).view(B, 1, -1)
        t.scatter_add_(2, idx, torch.where(ok, sums.reshape(B, H, -1), 0.0))
        t = t.view(B, H, r, r)
    return (t / layout.thumb_count[:, None]).float()


def span_attention(
    sums: torch.Tensor,  # [B, H, P, P] float64 pooled sums of p
    argmax: torch.Tensor,  # [B, H, L] float32 argmax key of each row, relative to start
    ranges: KeyRanges,
    layout: PoolLayout,
) -> list[torch.Tensor | None]:
    """Per batch row [H, Sq, Sk, 2] float64 (``stats.SPAN_FIELDS``: mass, top1) over its spans (``span_names``),
    or None for a row without spans: mass(Q, K) = sum of the pooled cells of Q x K / Q's rows; top1(Q, K) = share of
    Q's rows whose argmax key lies in K."""
    out: list[torch.Tensor | None] = []
    if layout.spans is None:
        return [None] * sums.shape[0]
    sums = sums.double().cpu()
    argmax = argmax.cpu()
    for b, spans in enumerate(layout.spans):
        if not spans:
            out.append(None)
            continue
        st, n = int(ranges.start[b]), int(ranges.end[b] - ranges.start[b])
        edges = layout.edges[b]
        pos_in = []  # per span: [n] bool membership of the prompt's positions
        for pieces in spans.values():
            m = torch.zeros(n, dtype=torch.bool)
            for s, e in pieces:
                m[s:e] = True
            pos_in.append(m)
        last = torch.zeros(n, dtype=torch.bool)
        last[n - 1] = True
        qmask = torch.stack(pos_in + [last])  # [Sq, n]
        kmask = torch.stack(pos_in)  # [Sk, n]
        # a pooled cell belongs to a span when its first position does (the spans' boundaries are cell edges)
        first = (edges[:-1] - st).clamp(0, max(n - 1, 0))
        real = (edges[1:] > edges[:-1]).double()  # [P]
        qc = qmask[:, first].double() * real  # [Sq, P]
        kc = kmask[:, first].double() * real  # [Sk, P]
        mass = torch.einsum("qa,hac,kc->hqk", qc, sums[b], kc) / qmask.sum(1).double()[None, :, None]
        am = argmax[b, :, st : st + n].long().clamp(0, max(n - 1, 0))  # [H, n]
        hit = kmask.double().T[am]  # [H, n, Sk]: row i's argmax in K
        top1 = torch.einsum("qi,hik->hqk", qmask.double() / qmask.sum(1, keepdim=True), hit)
        out.append(torch.stack([mass, top1], -1))
    return out
