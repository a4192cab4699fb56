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
from collections.abc import Sequence

import numpy as np
import torch
from attnscope.kernels import KeyRanges, attn_stats, down_proj_stats
from attnscope.kernels.reference import attention_probs_ref

from .config import ProfileConfig, PromptError
from .corpus import PromptItem
from .data import ATTN_VECTORS, LENS_ARRAYS, SCHEMA_VERSION, mean_distance, topk_fold
from .hooks import capture, model_geometry
from .lens import LensCollector, next_token_entropy, residual_hooks
from .memories import top_contexts
from .store import Shard

__all__ = ["Engine", "config_digest", "release_freed_memory", "weights_digest"]

_LENS_DTYPE = {"lens.top_id": np.int32, "lens.target_rank": np.int32}


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
        self.geom = model_geometry(model)
        self.Ly, self.H = self.geom["n_layers"], self.geom["n_heads"]
        for layer, head in cfg.keep_full:
            if not (0 <= layer < self.Ly and 0 <= head < self.H):
                raise ValueError(
                    f"keep_full ({layer}, {head}) is out of range: the model has {self.Ly} layers, {self.H} heads"
                )
        self.device = next(model.parameters()).device
        t = tokenizer
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)
        self.base = model.base_model
        self.vectors = ATTN_VECTORS
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
    def forward(self, batch_ids: list[np.ndarray]) -> dict:
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
        nb = cfg.spec.bins
        r = {
            "vec": {v: np.zeros((Ly, B, H, Lmax), np.float32) for v in self.vectors},
            "thumb_rel": np.zeros((Ly, H, R, R)),
            "thumb_rel_count": np.zeros((R, R), np.int64),
            "thumbs": [None] * B,
            "hist_all": np.zeros((Ly, H, nb), np.int64),
            "hist_log": np.zeros((Ly, H, nb), np.int64),
            "moments": np.zeros((Ly, H, 3)),
            "dist": np.zeros((Ly, B, H, 32)),  # per batch row
            "full": {},
            "mlp": {},
        }
        dev_ids = ids.to(self.device)
        # thumbnail cell t of a prompt of L tokens starts at position ceil(t L / r): its relative cell is that * R // L
        cells = []
        for b in range(B):
            L = int(lengths[b])
            rp = min(R, L)
            rel = np.array([-(-t * L // rp) for t in range(rp)]) * R // L
            cells.append((rp, rel[:, None], rel[None, :]))
            r["thumb_rel_count"][rel[:, None], rel[None, :]] += 1
            if cfg.keep_vectors:
                r["thumbs"][b] = np.zeros((Ly, H, rp, rp), np.float32)

        def on_attention(layer, q, k, scaling, window, lse=None):
            rr = ranges.with_window(window)
            st = attn_stats(
                q.detach(), k.detach(), scaling, rr, cfg.spec, cfg.impl, cfg.block_q, tokens=dev_ids, lse=lse
            )
            for name in ("hist_all", "hist_log", "moments", "dist"):
                r[name][layer] = st[name].cpu().numpy()
            for v in self.vectors:
                r["vec"][v][layer] = st[v].cpu().numpy()
            if self.device.type == "cpu" and Lmax >= 1024:  # long rows leave big freed blocks; short ones do not
                release_freed_memory()
            th = st["thumb"].cpu().numpy()  # [B, H, r, r], r = min(R, L): prompt b fills [:rp, :rp]
            rel_sum = r["thumb_rel"][layer]  # [H, R, R]
            for b, (rp, ra, rc) in enumerate(cells):  # one small numpy op per prompt and layer
                rel_sum[:, ra, rc] += th[b, :, :rp, :rp]
                if cfg.keep_vectors:
                    r["thumbs"][b][layer] = th[b, :, :rp, :rp]
            for lyr, head in cfg.keep_full:
                if lyr == layer:
                    kv = head // (H // k.shape[1])
                    p = attention_probs_ref(q[:, head : head + 1], k[:, kv : kv + 1], scaling, rr, upcast=False)
                    for b in range(B):
                        L = int(lengths[b])
                        r["full"][(b, layer, head)] = p[b, 0, :L, :L].float().cpu().numpy()

        sel = mask.bool().to(self.device)

        def on_down_proj(layer, x, y):
            xs = x.detach()[sel]  # [T_batch, d_ff]
            st = down_proj_stats(xs, y.detach()[sel], cfg.top_k, cfg.impl, contexts=cfg.neuron_contexts)
            if cfg.neuron_contexts and "ctx_value" not in st:  # this batch's candidates for the top-k per neuron
                st["ctx_value"], st["ctx_index"] = top_contexts(xs, cfg.neuron_contexts)  # [k, d_ff]
            r["mlp"][layer] = {name: t.cpu().numpy() for name, t in st.items()}

        lens = LensCollector(self.model, dev_ids, mask.to(self.device), cfg.impl) if cfg.logit_lens else None
        with (
            torch.no_grad(),
            capture(self.model, on_attention, on_down_proj),
            residual_hooks(self.model, lens.on_layer) if lens else contextlib.nullcontext(),
        ):
            hidden = self.base(input_ids=dev_ids, attention_mask=mask.to(self.device), use_cache=False)[0]
            # real tokens only; the vocabulary is reduced a chunk at a time, never [batch, L, vocab] logits
            if lens is not None:  # the last layer's lens is the model's own distribution: one reduction serves both
                r["lens"] = {f: t.numpy() for f, t in lens.finish().items()}
                r["entropy"] = r["lens"]["entropy"][-1].astype(np.float32)
            else:
                r["entropy"] = next_token_entropy(self.model, hidden[sel], cfg.impl).float().cpu().numpy()
        r["lengths"] = lengths
        return r

    # -- a shard --
    def run_shard(
        self, items: Sequence[PromptItem], token_lists: list[np.ndarray], bar=None, token_text: list[str] | None = None
    ) -> Shard:
        """The ``Shard`` of ``items`` (in their order), computed in length-bucketed batches; ``token_text`` is the
        decoded text of every token (decoded here when None)."""
        cfg, Ly, H, R = self.cfg, self.Ly, self.H, self.cfg.spec.thumb_size
        V, nb = len(self.vectors), cfg.spec.bins
        P = len(items)
        lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        T = int(offsets[-1])
        keep = cfg.keep_vectors
        vectors = {f"attn.{v}": np.zeros((Ly, H, T), np.float32) for v in self.vectors} if keep else None
        thumbs: list = [None] * P if keep else None
        mlp = {
            "in_norm": np.zeros((Ly, T), np.float32),
            "out_norm": np.zeros((Ly, T), np.float32),
            "topk_idx": np.zeros((Ly, T, cfg.top_k), np.int32),
            "topk_val": np.zeros((Ly, T, cfg.top_k), np.float32),
        }
        entropy = np.zeros(T, np.float32)
        lens = {n: np.zeros((Ly, T), _LENS_DTYPE.get(n, np.float32)) for n in LENS_ARRAYS} if cfg.logit_lens else None
        row_means = np.zeros((P, Ly, H, V), np.float32)
        distance = np.full((P, Ly, H), np.nan)
        acc = {
            "attn.hist_all": np.zeros((Ly, H, nb), np.int64),
            "attn.hist_log": np.zeros((Ly, H, nb), np.int64),
            "attn.moments": np.zeros((Ly, H, 3)),
            "attn.dist": np.zeros((Ly, H, 32)),
            "attn.self_hist": np.zeros((Ly, H, nb), np.int64),
            "attn.self_moments": np.zeros((Ly, H, 3)),
            "attn.final_hist": np.zeros((Ly, H, nb), np.int64),
            "attn.final_moments": np.zeros((Ly, H, 3)),
            "attn.row_sums": np.zeros((Ly, H, V)),
            "attn.thumb_rel": np.zeros((Ly, H, R, R)),
            "attn.thumb_rel_count": np.zeros((R, R), np.int64),
        }
        full: dict = {}
        for sel in self.batches(lengths):
            r = self.forward([token_lists[i] for i in sel])
            B, Lmax = len(sel), int(r["lengths"].max())
            blen = r["lengths"]
            valid = np.arange(Lmax)[None, :] < blen[:, None]  # [B, Lmax]
            for name in ("hist_all", "hist_log", "moments"):
                acc[f"attn.{name}"] += r[name]
            acc["attn.dist"] += r["dist"].sum(1)
            # per prompt: vector sums -> means, head accumulators
            sums = np.stack([r["vec"][v].sum(-1, dtype=np.float64) for v in self.vectors], -1)  # [Ly, B, H, V]
            acc["attn.row_sums"] += sums.sum(1)
            row_means[sel] = (sums / blen[None, :, None, None]).transpose(1, 0, 2, 3)
            distance[sel] = mean_distance(r["dist"]).transpose(1, 0, 2)  # [Ly, B, H, 32] -> [B, Ly, H]
            # histograms and moments of p_ii and of the final rows, from the vectors (valid positions only)
            for which, v in (("self", "diag"), ("final", "final")):
                x = r["vec"][v].transpose(0, 2, 1, 3)[:, :, valid]  # [Ly, H, n]
                _add_hist(acc[f"attn.{which}_hist"], x, nb)
                x64 = x.astype(np.float64)
                acc[f"attn.{which}_moments"] += np.stack(
                    [np.full(x.shape[:2], float(x.shape[-1])), x64.sum(-1), (x64 * x64).sum(-1)], -1
                )
            # thumbnails, pooled again in relative position so prompts of any length add up
            acc["attn.thumb_rel"] += r["thumb_rel"]
            acc["attn.thumb_rel_count"] += r["thumb_rel_count"]
            for b, i in enumerate(sel.tolist()):
                L = int(blen[b])
                lo, hi = offsets[i], offsets[i + 1]
                if keep:
                    for v in self.vectors:
                        vectors[f"attn.{v}"][:, :, lo:hi] = r["vec"][v][:, b, :, :L]
                    thumbs[i] = r["thumbs"][b]
            for (b, layer, head), m in r["full"].items():
                full[(int(sel[b]), layer, head)] = m
            # down_proj: the batch's real tokens in row-major order -> shard token positions
            where = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in sel.tolist()])
            entropy[where] = r["entropy"]
            if lens is not None:
                for f, a in r["lens"].items():
                    lens[f"lens.{f}"][:, where] = a
            for layer in range(Ly):
                st = r["mlp"][layer]
                for name in mlp:
                    mlp[name][layer, where] = st[name]
                mx, amx = st["neuron_max"].astype(np.float32), where[st["neuron_argmax"]]
                if "mlp.neuron_max" not in acc:
                    F = mx.shape[0]
                    acc["mlp.neuron_max"] = np.full((Ly, F), -np.inf, np.float32)
                    acc["mlp.neuron_argmax"] = np.zeros((Ly, F), np.int64)
                    acc["mlp.neuron_sum"] = np.zeros((Ly, F))
                    acc["mlp.neuron_sumsq"] = np.zeros((Ly, F))
                cur = acc["mlp.neuron_max"][layer]
                take = (mx > cur) | ((mx == cur) & (amx < acc["mlp.neuron_argmax"][layer]))  # ties: earlier token
                acc["mlp.neuron_max"][layer] = np.where(take, mx, cur)
                acc["mlp.neuron_argmax"][layer] = np.where(take, amx, acc["mlp.neuron_argmax"][layer])
                acc["mlp.neuron_sum"][layer] += st["neuron_sum"]
                if "ctx_value" in st:  # FFN memories: fold this batch's top-k tokens per neuron (shard positions)
                    if "mlp.ctx_value" not in acc:
                        shape = (Ly, cfg.neuron_contexts, st["ctx_value"].shape[1])
                        acc["mlp.ctx_value"] = np.full(shape, -np.inf, np.float32)
                        acc["mlp.ctx_token"] = np.full(shape, -1, np.int64)
                    acc["mlp.ctx_value"][layer], acc["mlp.ctx_token"][layer] = topk_fold(
                        acc["mlp.ctx_value"][layer],
                        acc["mlp.ctx_token"][layer],
                        st["ctx_value"],
                        where[st["ctx_index"]],
                    )
                acc["mlp.neuron_sumsq"][layer] += st["neuron_sumsq"]
            if bar is not None:
                bar.tokens += int(blen.sum())
                rate = bar.tokens / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                bar.update(B)
        token_ids = np.concatenate(token_lists) if token_lists else np.zeros(0, np.int64)
        return Shard(
            prompt_ids=[it.id for it in items],
            sha256=[hashlib.sha256(it.text.encode()).hexdigest() for it in items],
            previews=[it.text[:80] for it in items],
            lengths=lengths,
            token_ids=token_ids,
            token_text=self.decode(token_ids) if token_text is None else token_text,
            logit_entropy=entropy,
            mlp=mlp,
            row_means=row_means,
            distance=distance,
            accum=acc,
            vectors=vectors,
            thumbs=thumbs,
            full=full,
            lens=lens,
            lens_vocab=self._vocab(lens["lens.top_id"]) if lens is not None else None,
        )

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


def _libc():
    """glibc's ``malloc_trim`` and ``mallinfo2`` (None where there is no glibc >= 2.33)."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_TRIM_ABOVE = 1 << 29  # free heap bytes worth giving back


def release_freed_memory() -> None:
    """Give the pages of freed heap blocks back to the OS once they add up to 512 MiB (glibc; a no-op elsewhere).

    glibc keeps what a layer frees for the next one: ~0.4 GB at 2,048 tokens of SmolLM2 (reused, so trimming it only
    makes the pages fault back in: ~1 s a profile at a 256 MiB threshold), but a pool of 1.2-1.7 GB at 8,192 tokens
    that set the peak RSS (3.8 GiB without a trim, 2.56 GiB trimming past 1 GiB, 1.79 GiB past 512 MiB).
    """
    if _LIBC is not None and _LIBC.mallinfo2().fordblks > _TRIM_ABOVE:
        _LIBC.malloc_trim(0)


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
