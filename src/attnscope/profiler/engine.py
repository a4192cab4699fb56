"""The engine of a profile run: one forward pass over a padded batch with every statistic captured, and the
reduction of a shard's batches to a ``Shard`` on the host (numpy over whole [layers, batch, heads, tokens] arrays,
never a Python loop over heads or tokens)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from attnscope.kernels import KeyRanges, attn_stats, down_proj_stats
from attnscope.kernels.reference import attention_probs_ref
from attnscope.kernels.stats import (
    ACCUMULATORS,
    CTX_VALUE,
    DIST,
    DIST_ACC,
    EXPERT_TOKENS,
    EXPERT_WEIGHT,
    HEAD_SCORES,
    HIST_ALL,
    HIST_ALL_ACC,
    HIST_LOG,
    HIST_LOG_ACC,
    LAMINAR,
    MOMENTS,
    MOMENTS_ACC,
    N_DIST_BUCKETS,
    NEURON_MAX,
    NEURON_SUM,
    NEURON_SUMSQ,
    ROW_SUMS,
    SPAN,
    THUMB,
    THUMB_REL,
    THUMB_REL_COUNT,
    VECTORS,
)

from .accum import ACCUM, Accumulator
from .blocks import base_model
from .columns import LENS_TOP_ID, LOGIT_ENTROPY, MLP_TOKEN_ARRAYS, ROUTING_ARRAYS, TOKEN_IDS, token_columns
from .config import ProfileConfig, PromptError
from .corpus import PromptItem
from .data import ATTN_VECTORS, SCHEMA_VERSION, mean_distance
from .experts import expert_neuron_stats, expert_token_stats, fold_expert_neurons
from .hooks import AttentionCall, as_tokens, capture
from .hostmem import release_freed_memory
from .lens import LensCollector, next_token_entropy, residual_hooks
from .memories import top_contexts
from .probe import describe_layers
from .spans import fold_layer_spans, head_scores, token_spans
from .store import Shard

__all__ = [
    "BatchStats",
    "Engine",
    "call_stats",
    "config_digest",
    "moe_block_stats",
    "release_freed_memory",
    "weights_digest",
]

# the accumulators one forward pass fills directly (the others are folded from its vectors and down_proj statistics)
_BATCH_SUMS = (HIST_ALL_ACC, HIST_LOG_ACC, MOMENTS_ACC, THUMB_REL, THUMB_REL_COUNT)
# the attention accumulators of a shard, allocated up front (the down_proj ones once d_ff is known)
_ATTN_ACCUMS = tuple(a for a in ACCUMULATORS if a.key.startswith("attn."))


@dataclass
class BatchStats:
    """Everything one forward pass of B prompts yields, on the host (Lmax: the longest prompt of the batch)."""

    lengths: np.ndarray  # [B] real tokens of each prompt
    vec: np.ndarray  # [V, Ly, B, H, Lmax] float32: every per-row vector by slot, 0 past each prompt's end
    sums: Accumulator  # the pair histograms and moments, and the thumbnails in relative position, of the batch
    dist: np.ndarray  # [Ly, B, H, N_DIST_BUCKETS] float64: distance buckets per prompt
    thumbs: list  # per prompt [Ly, H, r, r] float32 (the vectors tier), else None
    full: dict = field(default_factory=dict)  # (batch row, layer, head) -> [L, L] kept full matrices
    mlp: dict = field(default_factory=dict)  # layer -> down_proj statistics of the batch's real tokens, row-major
    route: dict = field(default_factory=dict)  # MoE layer -> (experts [T_batch, k] int32, weights [T_batch, k])
    experts: dict = field(default_factory=dict)  # MoE layer -> ``expert_neuron_stats`` of the batch
    entropy: np.ndarray | None = None  # [T_batch] next-token entropy of the real tokens, row-major
    lens: dict | None = None  # logit-lens field -> [Ly, T_batch]
    spans: list = field(default_factory=list)  # per prompt [Ly, H, Sq, Sk, 2] span attention, or None
    scores: np.ndarray | None = None  # [B, Ly, H, len(HEAD_SCORES)] per-prompt head scores (``spans.head_scores``)


def call_stats(call: AttentionCall, ranges: KeyRanges, spec, impl: str, block_q: int, tokens=None, spans=None) -> dict:
    """``attn_stats`` of one captured attention layer: the layer's window or chunks on the batch's key ranges, the
    module's scaling, softcapping and learned sinks (with the kernel's lse where the call has one)."""
    return attn_stats(
        call.query.detach(),
        call.key.detach(),
        call.scaling,
        ranges.with_window(call.window, call.chunk),
        spec,
        impl,
        block_q,
        tokens=tokens,
        lse=call.lse,
        softcap=call.softcap,
        sinks=call.sinks,
        spans=spans,
    )


def moe_block_stats(y: torch.Tensor, top_k: int, neurons: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The per-token MLP statistics of a mixture-of-experts block from its output y [T, d_model] (its norm) and
    its chosen experts' neurons (``experts.expert_token_stats``: input norm, top neurons; None: NaN / -1)."""
    T = y.shape[0]
    if neurons is None:
        neurons = {
            "in_norm": torch.full((T,), float("nan"), device=y.device),
            "topk_idx": torch.full((T, top_k), -1, dtype=torch.int32, device=y.device),
            "topk_val": torch.full((T, top_k), float("nan"), device=y.device),
        }
    return neurons | {"out_norm": torch.linalg.vector_norm(y.float(), dim=-1)}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_digest(model) -> str:
    d = model.config.to_dict()
    for key in (
        "_name_or_path",
        "transformers_version",
        "_attn_implementation",
        "_attn_implementation_internal",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "architectures",
        "use_cache",
    ):
        d.pop(key, None)
    return _digest(d)


def weights_digest(model) -> str:
    """A fingerprint of the weights: hash of the first values of the input embedding."""
    w = model.get_input_embeddings().weight.detach()
    head = w.reshape(-1)[:65536].float().cpu().numpy()
    return hashlib.sha256(head.tobytes()).hexdigest()[:16]


def _versions() -> dict:
    import transformers

    from attnscope import __version__

    v = {"attnscope": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    v["python"] = platform.python_version()
    if "triton" in sys.modules:
        v["triton"] = sys.modules["triton"].__version__
    return v


class Engine:
    """Runs the model on batches of prompts and reduces every batch to a ``Shard`` on the host.

    The per-batch work on the host is numpy over whole [layers, batch, heads, tokens] arrays, never a Python loop
    over heads or tokens.
    """

    def __init__(self, model, tokenizer, cfg: ProfileConfig):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.layers = describe_layers(model)  # raises UnsupportedModelError before any work
        self.geom = self.layers["geometry"]
        self._noted: set[str] = set()
        self._note(self.layers["notes"])
        self.Ly, self.H = self.geom["n_layers"], self.geom["n_heads"]
        for layer, head in cfg.keep_full:
            if not (0 <= layer < self.Ly and 0 <= head < self.H):
                raise ValueError(
                    f"keep_full ({layer}, {head}) is out of range: the model has {self.Ly} layers, {self.H} heads"
                )
        self.device = next(model.parameters()).device
        t = tokenizer
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)
        self.base = base_model(model)
        self.vectors = ATTN_VECTORS
        spec = cfg.spec
        self.dims = {"Ly": self.Ly, "H": self.H, "bins": spec.bins, "R": spec.thumb_size, "V": len(VECTORS)}
        self.moe = self.layers["experts"]  # {"n_experts", "experts_per_token", "expert_dim"}; None: a dense model
        if self.moe:
            self.dims["E"] = self.moe["n_experts"]
        self._decoded: dict[int, str] = {}
        # the tokenising thread and the lens' decoding (main thread) share the tokenizer: one call at a time
        self._tok_lock = threading.Lock()

    # -- tokenisation (batched, once per shard window) --
    def tokenize(self, items: Sequence[PromptItem], first_index: int) -> list[np.ndarray]:
        with self._tok_lock:
            enc = self.tok([it.text for it in items], add_special_tokens=True)["input_ids"]
        max_pos, cfg = self.geom["max_positions"], self.cfg
        out = []
        for n, ids in enumerate(enc):
            i = first_index + n
            if not ids:
                raise PromptError(f"prompt {i} has no tokens")
            if max_pos and len(ids) > max_pos and not cfg.allow_long:
                raise PromptError(
                    f"prompt {i} has {len(ids)} tokens, more than the model's {max_pos} positions "
                    "(allow it with allow_long=True / --allow-long)"
                )
            if cfg.keep_full and len(ids) > cfg.full_max_tokens:
                raise PromptError(
                    f"prompt {i} has {len(ids)} tokens: keeping full matrices is limited to {cfg.full_max_tokens} "
                    "(raise full_max_tokens / --full-max-tokens)"
                )
            out.append(np.asarray(ids, dtype=np.int64))
        return out

    def decode(self, ids: np.ndarray) -> list[str]:
        """Token texts, each id decoded once per run (the vocabulary bounds the cache)."""
        with self._tok_lock:
            cache = self._decoded
            missing = [int(t) for t in np.unique(ids) if int(t) not in cache]
            for t, text in zip(missing, self.tok.batch_decode([[t] for t in missing])):
                cache[t] = text
            return [cache[t] for t in ids.tolist()]

    def batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Length-bucketed batches of a shard: prompts sorted by length, then cut in runs of ``batch_size``, or
        (auto) cut where padding would cost more than another forward pass (``_auto_batches``). Within a batch the
        prompts keep their corpus order, so an exact tie between rows (a neuron's max, its top contexts) goes to
        the earlier prompt, as between batches, shards and merged runs."""
        cfg = self.cfg
        order = np.argsort(lengths, kind="stable")
        if cfg.batch_size > 0:
            return [np.sort(order[i : i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
        per_batch = _BATCH_COST_TOKENS.get(self.device.type, _BATCH_COST_TOKENS["cuda"])
        cuts = _auto_batches(lengths[order], cfg.token_budget, per_batch)
        return [np.sort(order[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]

    # -- one forward pass --
    def forward(self, batch_ids: list[np.ndarray], spans: list | None = None) -> BatchStats:
        """Run the model on one padded batch (``spans``: per prompt its named spans in tokens, or None) and bring
        every statistic to the host (``BatchStats``)."""
        cfg, Ly, H, R = self.cfg, self.Ly, self.H, self.cfg.spec.thumb_size
        B = len(batch_ids)
        lengths = np.array([len(x) for x in batch_ids])
        Lmax = int(lengths.max())
        ids = torch.full((B, Lmax), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, Lmax), dtype=torch.long)
        for b, x in enumerate(batch_ids):
            ids[b, : len(x)] = torch.from_numpy(x)
            mask[b, : len(x)] = 1
        ranges = KeyRanges.from_attention_mask(mask)
        r = BatchStats(
            lengths=lengths,
            vec=np.zeros((len(VECTORS), Ly, B, H, Lmax), np.float32),
            sums=Accumulator().allocate(self.dims, *_BATCH_SUMS),
            dist=np.zeros((Ly, B, H, N_DIST_BUCKETS)),
            thumbs=[np.zeros((Ly, H, min(R, int(n)), min(R, int(n))), np.float32) for n in lengths]
            if cfg.keep_vectors
            else [None] * B,
            spans=[None] * B,
        )
        spans = spans if spans is not None and any(s is not None for s in spans) else None
        dev_ids = ids.to(self.device)
        # thumbnail cell t of a prompt of L tokens starts at position ceil(t L / r): its relative cell is that * R // L
        cells = []  # per distinct length: (its prompts, rp, relative cells of rows, of columns)
        for L in np.unique(lengths).tolist():
            rp = min(R, L)
            rel = np.array([-(-t * L // rp) for t in range(rp)]) * R // L
            rows = np.flatnonzero(lengths == L)
            cells.append((rows, rp, rel[:, None], rel[None, :]))
            r.sums[THUMB_REL_COUNT.key][rel[:, None], rel[None, :]] += len(rows)

        def on_attention(call: AttentionCall):
            layer, q, k = call.layer, call.query, call.key
            st = call_stats(call, ranges, cfg.spec, cfg.impl, cfg.block_q, tokens=dev_ids, spans=spans)
            fold_layer_spans(r.spans, st.get(SPAN.name), layer, Ly)
            for stat in (HIST_ALL, HIST_LOG, MOMENTS):
                r.sums.fold(ACCUM[stat.key], st[stat.name].cpu().numpy(), at=layer)
            r.dist[layer] = st[DIST.name].cpu().numpy()
            for s in VECTORS:
                r.vec[s.slot, layer] = st[s.name].cpu().numpy()
            if self.device.type == "cpu" and Lmax >= 1024:  # long rows leave big freed blocks; short ones do not
                release_freed_memory()
            th = st[THUMB.name].cpu().numpy()  # [B, H, r, r], r = min(R, L): prompt b fills [:rp, :rp]
            rel_sum = r.sums[THUMB_REL.key][layer]  # [H, R, R]
            for rows, rp, ra, rc in cells:  # one small numpy op per distinct length and layer
                rel_sum[:, ra, rc] += th[rows, :, :rp, :rp].sum(0, dtype=np.float64)
                if cfg.keep_vectors:
                    for b in rows.tolist():
                        r.thumbs[b][layer] = th[b, :, :rp, :rp]
            for lyr, head in cfg.keep_full:
                if lyr == layer:
                    kv = head // (H // k.shape[1])
                    rr = ranges.with_window(call.window, call.chunk)
                    sink = None if call.sinks is None else call.sinks[head : head + 1]
                    p = attention_probs_ref(
                        q[:, head : head + 1],
                        k[:, kv : kv + 1],
                        call.scaling,
                        rr,
                        upcast=False,
                        softcap=call.softcap,
                        sinks=sink,
                    )
                    for b in range(B):
                        L = int(lengths[b])
                        r.full[(b, layer, head)] = p[b, 0, :L, :L].float().cpu().numpy()

        sel = mask.bool().to(self.device)
        layer_rows: dict = {}  # (name, shape, dtype) -> [Ly, *shape] array of every layer's result

        def stacked(layer: int, st: dict) -> dict:
            # each layer's small results copied into arrays allocated once per batch and freed at once: kept as
            # they come, they would pin the heap between the layers' big freed blocks, and it would grow
            out = {}
            for name, t in st.items():
                a = t.cpu().numpy()
                k = (name, a.shape, a.dtype)
                if k not in layer_rows:
                    layer_rows[k] = np.empty((Ly, *a.shape), a.dtype)
                out[name] = layer_rows[k][layer]
                out[name][...] = a
            return out

        def on_mlp(layer, x, y):
            x, y = as_tokens(x, sel), as_tokens(y, sel)
            if x is None:  # a mixture-of-experts block: its output, and its chosen experts' neurons (on_route)
                st = moe_block_stats(y.detach()[sel], cfg.top_k, expert_tokens.pop(layer, None))
                r.mlp[layer] = {name: t.cpu().numpy() for name, t in st.items()}
                return
            xs = x.detach()[sel]  # [T_batch, d_ff]
            st = down_proj_stats(xs, y.detach()[sel], cfg.top_k, cfg.impl, contexts=cfg.neuron_contexts)
            if cfg.neuron_contexts and "ctx_value" not in st:  # this batch's candidates for the top-k per neuron
                st["ctx_value"], st["ctx_index"] = top_contexts(xs, cfg.neuron_contexts)  # [k, d_ff]
            r.mlp[layer] = stacked(layer, st)

        expert_tokens: dict[int, dict] = {}  # MoE layer -> its tokens' neuron statistics, until its on_mlp

        def on_route(layer, idx, w, acts):
            k = idx.shape[-1]
            idx = idx.reshape(B, Lmax, k)[sel]
            r.route[layer] = (idx.to(torch.int32).cpu().numpy(), w.reshape(B, Lmax, k)[sel].float().cpu().numpy())
            if acts is not None and acts.shape[-1]:
                acts = acts.reshape(B, Lmax, k, -1)[sel]
                expert_tokens[layer] = expert_token_stats(idx, acts, cfg.top_k)
                r.experts[layer] = expert_neuron_stats(idx, acts, self.dims["E"], cfg.neuron_contexts)

        lens = LensCollector(self.model, dev_ids, mask.to(self.device), cfg.impl) if cfg.logit_lens else None
        with (
            torch.no_grad(),
            capture(self.model, on_attention, on_mlp, on_route if self.moe else None, expert_neurons=True) as info,
            residual_hooks(self.model, lens.on_layer) if lens else contextlib.nullcontext(),
        ):
            hidden = self.base(input_ids=dev_ids, attention_mask=mask.to(self.device), use_cache=False)[0]
            self._note(info.notes)
            # real tokens only; the vocabulary is reduced a chunk at a time, never [batch, L, vocab] logits
            if lens is not None:  # the last layer's lens is the model's own distribution: one reduction serves both
                r.lens = {f: t.numpy() for f, t in lens.finish().items()}
                r.entropy = r.lens["entropy"][-1].astype(np.float32)
            else:
                r.entropy = next_token_entropy(self.model, hidden[sel], cfg.impl).float().cpu().numpy()
        r.scores = head_scores(r.vec, ids.numpy(), lengths, spans)
        return r

    # -- a shard --
    def run_shard(
        self, items: Sequence[PromptItem], token_lists: list[np.ndarray], bar=None, token_text: list[str] | None = None
    ) -> Shard:
        """The ``Shard`` of ``items`` (in their order), computed in length-bucketed batches; ``token_text`` is the
        decoded text of every token (decoded here when None)."""
        cfg = self.cfg
        lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
        out = _ShardBuffers(self, len(items), lengths)
        spans = token_spans(self.tok, items, self._tok_lock, token_lists)
        for sel in self.batches(lengths):
            batch = self.forward([token_lists[i] for i in sel], [spans[i] for i in sel])
            out.add_attention(sel, batch)
            out.add_mlp(sel, batch)
            if bar is not None:
                bar.tokens += int(batch.lengths.sum())
                rate = bar.tokens / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                bar.update(len(sel))
        token_ids = np.concatenate(token_lists) if token_lists else np.zeros(0, np.int64)
        return Shard(
            prompt_ids=[it.id for it in items],
            sha256=[hashlib.sha256(it.text.encode()).hexdigest() for it in items],
            previews=[it.text[:80] for it in items],
            lengths=lengths,
            token_text=self.decode(token_ids) if token_text is None else token_text,
            per_token={TOKEN_IDS: token_ids, **out.per_token},
            row_means=out.row_means,
            distance=out.distance,
            head_scores=out.scores,
            accum=dict(out.acc),
            vectors=out.vectors,
            thumbs=out.thumbs,
            full=out.full,
            lens_vocab=self._vocab(out.per_token[LENS_TOP_ID]) if cfg.logit_lens else None,
            spans=spans if any(s is not None for s in spans) else None,
            span_attn=out.span_attn if any(s is not None for s in spans) else None,
        )

    def _note(self, notes) -> None:
        """Say each new backend note once (``meta["attention_notes"]`` records the probe's)."""
        for note in sorted(set(notes) - self._noted):
            warnings.warn(f"attnscope: {note}", stacklevel=3)
            self._noted.add(note)

    def _vocab(self, ids: np.ndarray) -> dict[int, str]:
        """The decoded text of each distinct token id in ``ids``."""
        u = np.unique(ids)
        return dict(zip(u.tolist(), self.decode(u)))

    def meta(self) -> dict:
        model, cfg = self.model, self.cfg
        dtype = next(model.parameters()).dtype
        return {
            "model_id": cfg.model_id or getattr(model.config, "_name_or_path", None) or type(model).__name__,
            "config_digest": config_digest(model),
            "weights_digest": weights_digest(model),
            **self.geom,
            "d_ff": None,
            "model_dtype": str(dtype).replace("torch.", ""),
            "stats_dtype": "float32",
            "device": str(self.device),
            "attn_implementation": model.config._attn_implementation,
            "layers": self.layers["layers"],
            **{key: (self.moe or {}).get(key) for key in ("n_experts", "experts_per_token", "expert_dim")},
            "attention_notes": self.layers["notes"],
            "tokenizer": {
                "class": type(self.tok).__name__,
                "name_or_path": getattr(self.tok, "name_or_path", None),
            },
            "spec": cfg.spec.to_dict(),
            "top_k": cfg.top_k,
            "neuron_contexts": cfg.neuron_contexts,
            "logit_lens": cfg.logit_lens,
            "vectors": list(self.vectors),
            "keep_vectors": cfg.keep_vectors,
            "config": cfg.to_dict(),
            "versions": _versions(),
            "schema_version": SCHEMA_VERSION,
        }


def _fill(c) -> float:
    """A token column's value before it is written: 0, or on a MoE model's dense layers no expert (-1) and no
    weight (NaN)."""
    if not c.moe:
        return 0
    return np.nan if np.dtype(c.dtype).kind == "f" else -1


class _ShardBuffers:
    """The arrays of one shard, filled batch by batch in corpus order (``Engine.run_shard``)."""

    def __init__(self, eng: Engine, P: int, lengths: np.ndarray):
        cfg, Ly, H = eng.cfg, eng.Ly, eng.H
        self.cfg, self.dims = cfg, eng.dims
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        T = int(self.offsets[-1])
        keep = cfg.keep_vectors
        self.vectors = {s.key: np.zeros((Ly, H, T), np.float32) for s in VECTORS} if keep else None
        self.thumbs: list | None = [None] * P if keep else None
        # every per-token array but the token ids (the caller's) and the derived lens text, as the run stores it
        shape = {False: (T,), True: (Ly, T)}
        widths = {"top_k": cfg.top_k, "experts_per_token": (eng.moe or {}).get("experts_per_token")}
        self.per_token = {
            c.key: np.full(shape[c.per_layer] + ((widths[c.width],) if c.width else ()), _fill(c), c.dtype)
            for c in token_columns(cfg.logit_lens, bool(eng.moe))
            if c.key not in (None, TOKEN_IDS) and not c.derived
        }
        self.row_means = np.zeros((P, Ly, H, len(VECTORS)), np.float32)
        self.distance = np.full((P, Ly, H), np.nan)
        self.scores = np.full((P, Ly, H, len(HEAD_SCORES)), np.nan)
        self.acc = Accumulator().allocate(self.dims, *_ATTN_ACCUMS)
        self.full: dict = {}
        self.span_attn: list = [None] * P

    def add_attention(self, sel: np.ndarray, r: BatchStats) -> None:
        """Fold one batch's attention statistics (prompts ``sel`` of the shard)."""
        acc, nb, blen = self.acc, self.cfg.spec.bins, r.lengths
        valid = np.arange(r.vec.shape[-1])[None, :] < blen[:, None]  # [B, Lmax]
        for key, a in r.sums.items():
            acc.fold(ACCUM[key], a)
        acc.fold(DIST_ACC, r.dist.sum(1))
        # per prompt: vector sums -> means, head accumulators
        sums = np.moveaxis(r.vec.sum(-1, dtype=np.float64), 0, -1)  # [Ly, B, H, V]
        acc.fold(ROW_SUMS, sums.sum(1))
        self.row_means[sel] = (sums / blen[None, :, None, None]).transpose(1, 0, 2, 3)
        self.scores[sel] = r.scores
        self.distance[sel] = mean_distance(r.dist).transpose(1, 0, 2)  # [Ly, B, H, 32] -> [B, Ly, H]
        # histograms and moments of the weights the laminar views draw (p_ii, the final rows), valid positions only
        for lam in LAMINAR.values():
            if lam.samples is None:
                continue
            x = r.vec[lam.samples.slot].transpose(0, 2, 1, 3)[:, :, valid]  # [Ly, H, n]
            _add_hist(acc[lam.hist], x, nb)
            x64 = x.astype(np.float64)
            acc.fold(
                ACCUM[lam.moments],
                np.stack([np.full(x.shape[:2], float(x.shape[-1])), x64.sum(-1), (x64 * x64).sum(-1)], -1),
            )
        if self.vectors is not None:
            where = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in sel.tolist()])
            for s in VECTORS:  # the batch's real positions in row-major order are the prompts' shard positions
                self.vectors[s.key][:, :, where] = r.vec[s.slot].transpose(0, 2, 1, 3)[:, :, valid]
            for b, i in enumerate(sel.tolist()):
                self.thumbs[i] = r.thumbs[b]
        for (b, layer, head), m in r.full.items():
            self.full[(int(sel[b]), layer, head)] = m
        for b, i in enumerate(sel.tolist()):
            self.span_attn[i] = r.spans[b]

    def add_mlp(self, sel: np.ndarray, r: BatchStats) -> None:
        """Fold one batch's down_proj statistics, next-token entropy and logit lens (row-major real tokens ->
        shard token positions)."""
        acc, off, out = self.acc, self.offsets, self.per_token
        where = np.concatenate([np.arange(off[i], off[i + 1]) for i in sel.tolist()])
        out[LOGIT_ENTROPY][where] = r.entropy
        for f, a in (r.lens or {}).items():
            out[f"lens.{f}"][:, where] = a
        for layer, (idx, w) in sorted(r.route.items()):  # MoE routing: per token, and the experts' load
            out[ROUTING_ARRAYS[0]][layer, where] = idx
            out[ROUTING_ARRAYS[1]][layer, where] = w
            E = self.dims["E"]
            acc.allocate(self.dims, EXPERT_TOKENS, EXPERT_WEIGHT)
            acc.fold(EXPERT_TOKENS, np.bincount(idx.ravel(), minlength=E)[:E], at=layer)
            acc.fold(
                EXPERT_WEIGHT, np.bincount(idx.ravel(), weights=w.ravel().astype(np.float64), minlength=E)[:E], at=layer
            )
        for layer, st in sorted(r.experts.items()):
            fold_expert_neurons(acc, self.dims, layer, st, where)
        if not r.mlp:
            return
        # every layer at once: [layers, ...] stacks of the per-layer results, folded at those layers
        layers = sorted(r.mlp)
        for key in MLP_TOKEN_ARRAYS:
            out[key][np.ix_(layers, where)] = np.stack([r.mlp[i][key.removeprefix("mlp.")] for i in layers])
        dense = [i for i in layers if "neuron_max" in r.mlp[i]]  # a mixture-of-experts block has no neuron statistics
        if not dense:
            return
        st = {name: np.stack([r.mlp[i][name] for i in dense]) for name in r.mlp[dense[0]]}
        at = np.array(dense)
        dims = self.dims | {"F": st["neuron_max"].shape[-1], "k": self.cfg.neuron_contexts}
        acc.allocate(dims, NEURON_MAX, NEURON_SUM, NEURON_SUMSQ)
        acc.fold(NEURON_MAX, st["neuron_max"].astype(np.float32), where[st["neuron_argmax"]], at=at)  # ties: earlier
        acc.fold(NEURON_SUM, st["neuron_sum"], at=at)
        if "ctx_value" in st:  # FFN memories: fold this batch's top-k tokens per neuron (shard positions)
            acc.allocate(dims, CTX_VALUE)
            acc.fold(CTX_VALUE, st["ctx_value"], where[st["ctx_index"]], at=at)
        acc.fold(NEURON_SUMSQ, st["neuron_sumsq"], at=at)


# What one more forward pass costs, in padded tokens: on the CPU mostly reading the weights once more (~0.2 s a
# pass for SmolLM2-135M against ~2 ms a token); on a GPU, kernel launches against microseconds a token.
_BATCH_COST_TOKENS = {"cpu": 128, "cuda": 2048}
_AUTO_MAX_PROMPTS = 256


def _auto_batches(sorted_lengths: np.ndarray, token_budget: int, per_batch: int) -> list[int]:
    """Cut prompts sorted by length into consecutive batches of least estimated cost: each batch costs
    ``per_batch`` plus its padded tokens (prompts x longest), holds at most ``token_budget`` padded tokens
    (a longer prompt runs alone) and 256 prompts. Exact by dynamic programming over the cut points; returns
    the cuts (0 ... n)."""
    n = len(sorted_lengths)
    L = np.asarray(sorted_lengths, dtype=np.int64)
    cost = np.zeros(n + 1)
    prev = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # the last batch is prompts i..j-1, padded to L[j - 1]
        lo = max(0, j - _AUTO_MAX_PROMPTS, j - max(1, token_budget // int(L[j - 1])))
        i = np.arange(lo, j)
        c = cost[lo:j] + per_batch + (j - i) * int(L[j - 1])
        k = int(np.argmin(c))
        cost[j], prev[j] = c[k], lo + k
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(prev[cuts[-1]]))
    return cuts[::-1]


def _add_hist(hist: np.ndarray, x: np.ndarray, bins: int) -> None:
    """hist [Ly, H, bins] += linear histogram on [0, 1] of x [Ly, H, n], binned as the kernels bin (float32)."""
    Ly, H, n = x.shape
    b = np.clip(np.floor(x.astype(np.float32) * np.float32(bins)), 0, bins - 1).astype(np.int64)
    flat = b + (np.arange(Ly * H, dtype=np.int64) * bins).reshape(Ly, H, 1)
    hist += np.bincount(flat.ravel(), minlength=Ly * H * bins).reshape(Ly, H, bins)
