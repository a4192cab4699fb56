"""Profile a model on prompts: tokenise, batch, capture, reduce, and build a ``Profile``."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from attnscope.kernels import AttnStatsSpec, KeyRanges, attn_stats, down_proj_stats, set_cpu_threads
from attnscope.kernels.reference import attention_probs_ref

from .data import ATTN_VECTORS, SCHEMA_VERSION, TOKEN_AXIS, Profile
from .hooks import capture, model_geometry

__all__ = ["ProfileConfig", "PromptError", "profile", "run_with_stats"]


class PromptError(ValueError):
    """A prompt is empty, or longer than the model's positions."""


@dataclass(frozen=True)
class ProfileConfig:
    """How to profile. Every field has a default that suits a single long prompt."""

    spec: AttnStatsSpec = field(default_factory=AttnStatsSpec)  # histogram bins, log range, thumbnail size
    batch_size: int = 1  # prompts per forward pass (padded to the longest of the batch)
    allow_long: bool = False  # allow prompts longer than the model's max_position_embeddings
    keep_full: tuple[tuple[int, int], ...] = ()  # (layer, head) pairs whose full L x L matrices are kept
    full_max_tokens: int = 4096  # refuse to keep a full matrix of a longer prompt (L^2 * 4 bytes each)
    top_k: int = 8  # down_proj neurons kept per token
    impl: str = "auto"  # "auto" (Triton on CUDA, torch on CPU), "torch" or "triton"
    block_q: int = 128  # query block of the torch path: memory O(heads * block_q * L) per layer
    threads: int | None = None  # CPU threads of torch and of the Numba statistics (None: torch's default)
    progress: bool = True  # tqdm bars on prompts and layers
    model_id: str | None = None  # recorded in the profile; default: the model's name_or_path

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.block_q < 1:
            raise ValueError(f"block_q must be >= 1, got {self.block_q}")
        if self.full_max_tokens < 1:
            raise ValueError(f"full_max_tokens must be >= 1, got {self.full_max_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        object.__setattr__(self, "keep_full", tuple((int(a), int(b)) for a, b in self.keep_full))

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(),
            "batch_size": self.batch_size,
            "allow_long": self.allow_long,
            "keep_full": [list(x) for x in self.keep_full],
            "full_max_tokens": self.full_max_tokens,
            "top_k": self.top_k,
            "impl": self.impl,
            "block_q": self.block_q,
        }


def run_with_stats(
    model: torch.nn.Module,
    batch: dict,
    spec: AttnStatsSpec = AttnStatsSpec(),
    top_k: int = 8,
    impl: str = "auto",
    block_q: int = 128,
) -> tuple[object, dict]:
    """Run ``model(**batch)`` once and return ``(output, stats)``; the output is the model's own.

    ``stats["attn"][layer]`` is the dict of ``attnscope.kernels.attn_stats`` for that layer (padded batch layout,
    key ranges from ``batch["attention_mask"]``), ``stats["mlp"][layer]`` the dict of ``down_proj_stats`` over the
    real tokens of the batch in row-major order.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    ranges = KeyRanges.full(ids.shape[0], ids.shape[1]) if mask is None else KeyRanges.from_attention_mask(mask)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    stats: dict = {"attn": {}, "mlp": {}}

    def on_attention(layer, q, k, scaling, window, lse=None):
        r = ranges.with_window(window)
        stats["attn"][layer] = attn_stats(q.detach(), k.detach(), scaling, r, spec, impl, block_q, tokens=ids, lse=lse)

    def on_down_proj(layer, x, y):
        sel = valid.to(x.device)
        stats["mlp"][layer] = down_proj_stats(x.detach()[sel], y.detach()[sel], top_k, impl)

    with torch.no_grad(), capture(model, on_attention, on_down_proj):
        output = model(**batch)
    return output, stats


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_digest(model) -> str:
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


def _weights_digest(model) -> str:
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


def _tokenize(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"prompt {i} is empty")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise PromptError(f"prompt {i} has no tokens")
        out.append(list(ids))
    return out


class _Builder:
    """Collects per-layer statistics of each batch into per-prompt arrays, then one ``Profile``."""

    def __init__(self, geom: dict, cfg: ProfileConfig):
        Ly, H, nb = geom["n_layers"], geom["n_heads"], cfg.spec.bins
        self.geom, self.cfg = geom, cfg
        self.hist_all = np.zeros((Ly, H, nb), np.int64)
        self.hist_log = np.zeros((Ly, H, nb), np.int64)
        self.moments = np.zeros((Ly, H, 3))
        self.dist = np.zeros((Ly, H, 32))
        self.prompt_arrays: list[dict[str, np.ndarray]] = []  # per prompt: name -> [Ly, H, L] etc.
        self.thumbs: list[np.ndarray] = []
        self.full: dict[str, np.ndarray] = {}
        self.neuron_max = self.neuron_argmax = self.neuron_sum = self.neuron_sumsq = None
        self.n_tokens = 0

    def new_prompts(self, lengths: list[int]) -> None:
        Ly, H = self.geom["n_layers"], self.geom["n_heads"]
        for L in lengths:
            arrs = {f"attn.{v}": np.zeros((Ly, H, L), np.float32) for v in ATTN_VECTORS}
            arrs["mlp.in_norm"] = np.zeros((Ly, L), np.float32)
            arrs["mlp.out_norm"] = np.zeros((Ly, L), np.float32)
            arrs["mlp.topk_idx"] = np.zeros((Ly, L, self.cfg.top_k), np.int32)
            arrs["mlp.topk_val"] = np.zeros((Ly, L, self.cfg.top_k), np.float32)
            self.prompt_arrays.append(arrs)
            R = min(self.cfg.spec.thumb_size, L)
            self.thumbs.append(np.zeros((Ly, H, R, R), np.float32))

    def add_attention(self, layer: int, st: dict, first: int, ranges: KeyRanges) -> None:
        self.hist_all[layer] += st["hist_all"].cpu().numpy()
        self.hist_log[layer] += st["hist_log"].cpu().numpy()
        self.moments[layer] += st["moments"].cpu().numpy()
        self.dist[layer] += st["dist"].cpu().numpy()
        vecs = {v: st[v].cpu().numpy() for v in ATTN_VECTORS}  # [B, H, Lpad]
        thumb = st["thumb"].cpu().numpy()  # [B, H, R, R]
        for b, (lo, hi) in enumerate(zip(ranges.start.tolist(), ranges.end.tolist())):
            arrs = self.prompt_arrays[first + b]
            for v in ATTN_VECTORS:
                arrs[f"attn.{v}"][layer] = vecs[v][b, :, lo:hi]
            R = self.thumbs[first + b].shape[-1]
            self.thumbs[first + b][layer] = thumb[b, :, :R, :R]

    def add_full(self, prompt: int, layer: int, head: int, p: np.ndarray) -> None:
        self.full[f"attn.full.p{prompt}.l{layer}.h{head}"] = p.astype(np.float32)

    def add_mlp(self, layer: int, st: dict, first: int, lengths: list[int]) -> None:
        off = 0
        for b, L in enumerate(lengths):
            arrs = self.prompt_arrays[first + b]
            for name in ("in_norm", "out_norm", "topk_idx", "topk_val"):
                arrs[f"mlp.{name}"][layer] = st[name][off : off + L].cpu().numpy()
            off += L
        mx = st["neuron_max"].float().cpu().numpy()
        amx = st["neuron_argmax"].cpu().numpy() + self.n_tokens  # global token index
        if self.neuron_max is None:
            Ly, F = self.geom["n_layers"], mx.shape[0]
            self.neuron_max = np.full((Ly, F), -np.inf, np.float32)
            self.neuron_argmax = np.zeros((Ly, F), np.int64)
            self.neuron_sum = np.zeros((Ly, F))
            self.neuron_sumsq = np.zeros((Ly, F))
        take = mx > self.neuron_max[layer]
        self.neuron_max[layer] = np.where(take, mx, self.neuron_max[layer])
        self.neuron_argmax[layer] = np.where(take, amx, self.neuron_argmax[layer])
        self.neuron_sum[layer] += st["neuron_sum"].cpu().numpy()
        self.neuron_sumsq[layer] += st["neuron_sumsq"].cpu().numpy()

    def finish(
        self, meta: dict, prompts: list[dict], token_ids: list[np.ndarray], entropies: list[np.ndarray]
    ) -> Profile:
        arrays: dict[str, np.ndarray] = {
            "attn.hist_all": self.hist_all,
            "attn.hist_log": self.hist_log,
            "attn.moments": self.moments,
            "attn.dist": self.dist,
        }
        for name, axis in TOKEN_AXIS.items():
            if not name.startswith("tokens."):  # those two come from the tokenizer and the logits, below
                arrays[name] = np.concatenate([p[name] for p in self.prompt_arrays], axis=axis)
        arrays["mlp.neuron_max"] = self.neuron_max
        arrays["mlp.neuron_argmax"] = self.neuron_argmax
        arrays["mlp.neuron_sum"] = self.neuron_sum
        arrays["mlp.neuron_sumsq"] = self.neuron_sumsq
        for i, t in enumerate(self.thumbs):
            arrays[f"attn.thumb.p{i}"] = t
        arrays.update(self.full)
        arrays["tokens.ids"] = np.concatenate(token_ids).astype(np.int64)
        arrays["tokens.logit_entropy"] = np.concatenate(entropies).astype(np.float32)
        lengths = [len(t) for t in token_ids]
        arrays["prompts.offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Profile(meta=meta, prompts=prompts, arrays=arrays)


def _next_token_entropy(model, hidden: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position, lm_head applied a chunk at a time."""
    head = model.get_output_embeddings()
    out = []
    for t0 in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, t0 : t0 + chunk]).float()  # [B, chunk, V]
        logp = torch.log_softmax(logits, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))  # [B, chunk]
    return torch.cat(out, dim=1)  # [B, L]


def profile(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    config: ProfileConfig | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    **overrides,
) -> Profile:
    """Profile ``model`` on ``prompts`` and return the reduced statistics.

    Args:
        model: a loaded Hugging Face causal LM of a supported architecture, on any device.
        tokenizer: its tokenizer (special tokens are added as the tokenizer does by default).
        prompts: the texts; each is profiled on its own (batches are padded, padding never enters a statistic).
        config: a ``ProfileConfig``; keyword ``overrides`` replace single fields of it.
        on_batch: called with (prompts done, prompts total) after each batch.

    Returns:
        A ``Profile``; merge profiles of the same model with ``Profile.merge``.
    """
    import dataclasses

    from tqdm.auto import tqdm

    cfg = dataclasses.replace(config or ProfileConfig(), **overrides)
    geom = model_geometry(model)
    Ly, H = geom["n_layers"], geom["n_heads"]
    for layer, head in cfg.keep_full:
        if not (0 <= layer < Ly and 0 <= head < H):
            raise ValueError(f"keep_full ({layer}, {head}) is out of range: the model has {Ly} layers, {H} heads")
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    token_lists = _tokenize(tokenizer, prompts)
    max_pos = geom["max_positions"]
    for i, ids in enumerate(token_lists):
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

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    builder = _Builder(geom, cfg)
    token_ids: list[np.ndarray] = []
    entropies: list[np.ndarray] = []
    base = model.base_model
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=not cfg.progress)
    layer_bar = tqdm(total=Ly, desc="layers", unit="layer", leave=False, disable=not cfg.progress)
    was_training = model.training
    model.eval()
    threads_before = torch.get_num_threads()
    set_cpu_threads(cfg.threads)  # torch and the Numba pass share one thread count
    try:
        for first in range(0, len(prompts), cfg.batch_size):
            batch_ids = token_lists[first : first + cfg.batch_size]
            lengths = [len(x) for x in batch_ids]
            Lmax = max(lengths)
            ids = torch.full((len(batch_ids), Lmax), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch_ids), Lmax), dtype=torch.long)
            for b, x in enumerate(batch_ids):
                ids[b, : len(x)] = torch.tensor(x)
                mask[b, : len(x)] = 1
            ranges = KeyRanges.from_attention_mask(mask)
            builder.new_prompts(lengths)
            layer_bar.reset()

            def on_attention(layer, q, k, scaling, window, lse=None, _first=first, _ranges=ranges, _ids=ids):
                r = _ranges.with_window(window)
                st = attn_stats(
                    q.detach(), k.detach(), scaling, r, cfg.spec, cfg.impl, cfg.block_q, tokens=_ids, lse=lse
                )
                builder.add_attention(layer, st, _first, r)
                for lyr, head in cfg.keep_full:  # noqa: B023
                    if lyr == layer:
                        kv = head // (H // k.shape[1])
                        p = attention_probs_ref(q[:, head : head + 1], k[:, kv : kv + 1], scaling, r, upcast=False)
                        for b, L in enumerate(lengths):  # noqa: B023
                            builder.add_full(_first + b, layer, head, p[b, 0, :L, :L].cpu().numpy())
                layer_bar.update(1)

            sel = mask.bool().to(device)

            def on_down_proj(layer, x, y, _first=first, _sel=sel, _lengths=lengths):
                st = down_proj_stats(x.detach()[_sel], y.detach()[_sel], cfg.top_k, cfg.impl)
                builder.add_mlp(layer, st, _first, _lengths)

            with torch.no_grad(), capture(model, on_attention, on_down_proj):
                hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
                ent = _next_token_entropy(model, hidden)  # [B, L]
            builder.n_tokens += sum(lengths)
            for b, L in enumerate(lengths):
                token_ids.append(np.asarray(batch_ids[b]))
                entropies.append(ent[b, :L].float().cpu().numpy())
            bar.update(len(batch_ids))
            if on_batch is not None:
                on_batch(first + len(batch_ids), len(prompts))
    finally:
        layer_bar.close()
        bar.close()
        model.train(was_training)
        set_cpu_threads(threads_before)

    prompt_meta = []
    for text, ids in zip(prompts, token_lists):
        prompt_meta.append(
            {
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "n_tokens": len(ids),
                "preview": text[:80],
                "tokens": [tokenizer.decode([t]) for t in ids],
            }
        )
    dtype = next(model.parameters()).dtype
    meta = {
        "model_id": cfg.model_id or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "config_digest": _config_digest(model),
        "weights_digest": _weights_digest(model),
        **geom,
        "d_ff": int(builder.neuron_max.shape[1]) if builder.neuron_max is not None else None,
        "model_dtype": str(dtype).replace("torch.", ""),
        "stats_dtype": "float32",
        "device": str(device),
        "attn_implementation": model.config._attn_implementation,
        "tokenizer": {"class": type(tokenizer).__name__, "name_or_path": getattr(tokenizer, "name_or_path", None)},
        "spec": cfg.spec.to_dict(),
        "top_k": cfg.top_k,
        "config": cfg.to_dict(),
        "versions": _versions(),
        "schema_version": SCHEMA_VERSION,
    }
    return builder.finish(meta, prompt_meta, token_ids, entropies)
