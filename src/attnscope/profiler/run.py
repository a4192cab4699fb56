"""Profile a model on prompts: tokenise, batch, capture, reduce, and build a ``Profile``."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from attnscope.kernels import AttnStatsSpec, KeyRanges, down_proj_stats, set_cpu_threads
from attnscope.kernels.stats import HEAD_SCORES, NEURON_MAX, full_key, span_key, thumb_key

from .blocks import UnsupportedModelError
from .config import ProfileConfig, PromptError
from .corpus import PromptItem, check_char_spans
from .data import TOKEN_AXIS, Profile, combine_accum
from .engine import Engine, call_stats, moe_block_stats
from .experts import expert_token_stats
from .hooks import as_tokens, capture
from .hostmem import keep_freed_memory
from .store import Shard

__all__ = [
    "ProfileConfig",
    "PromptError",
    "PromptItem",
    "profile",
    "prompt_items",
    "run_corpus",
    "run_meta",
    "run_with_stats",
    "shard_windows",
    "shards_to_profile",
]


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

    def on_attention(call):
        stats["attn"][call.layer] = call_stats(call, ranges, spec, impl, block_q, tokens=ids)

    routed: dict[int, dict] = {}  # MoE layer -> its tokens' neuron statistics, until its on_mlp

    def on_route(layer, idx, w, acts):
        if acts is not None and acts.shape[-1]:
            sel = valid.reshape(-1).to(idx.device)
            routed[layer] = expert_token_stats(idx[sel], acts[sel], top_k)

    def on_mlp(layer, x, y):
        x, y = as_tokens(x, valid), as_tokens(y, valid)
        sel = valid.to(y.device)
        if x is None:  # a mixture-of-experts block
            stats["mlp"][layer] = moe_block_stats(y.detach()[sel], top_k, routed.pop(layer, None))
        else:
            stats["mlp"][layer] = down_proj_stats(x.detach()[sel], y.detach()[sel], top_k, impl)

    with torch.no_grad(), capture(model, on_attention, on_mlp, on_route, expert_neurons=True):
        output = model(**batch)
    if not stats["attn"]:
        raise UnsupportedModelError(
            f"unsupported architecture {getattr(model.config, 'model_type', None)!r}: no layer called transformers' "
            "attention interface (its modeling code computes attention itself), so its queries and keys cannot be seen"
        )
    return output, stats


def prompt_items(
    prompts: Sequence[str | PromptItem], first_index: int = 0, spans: Sequence[dict | None] | None = None
) -> list[PromptItem]:
    """``PromptItem``s of texts, ids ``<index>:<sha256 prefix>`` (stable for the same corpus); ``spans``: per prompt
    its named character spans (``{name: [(start, end), ...]}``, end exclusive), or None."""
    if spans is not None and len(spans) != len(prompts):
        raise PromptError(f"spans name {len(spans)} prompts' spans, there are {len(prompts)} prompts")
    out = []
    for i, t in enumerate(prompts, first_index):
        if isinstance(t, PromptItem):
            out.append(t)
        else:
            if not isinstance(t, str) or not t.strip():
                raise PromptError(f"prompt {i} is empty")
            out.append(PromptItem(f"{i}:{hashlib.sha256(t.encode()).hexdigest()[:16]}", t))
        if spans is not None and spans[i - first_index] is not None:
            out[-1] = dataclasses.replace(
                out[-1], spans=check_char_spans(spans[i - first_index], out[-1].text, f"prompt {i}", PromptError)
            )
    return out


def run_meta(model: torch.nn.Module, tokenizer, config: ProfileConfig | None = None) -> dict:
    """The identity and settings a run of ``model`` records (what ``run_corpus`` returns), before running it."""
    return Engine(model, tokenizer, config or ProfileConfig()).meta()


def shard_windows(items: Iterable[PromptItem], cfg: ProfileConfig) -> Iterator[tuple[int, list[PromptItem]]]:
    """Cut a stream of prompts into shard windows of ``cfg.shard_size`` prompts: (first index, items).

    The cut depends only on the corpus, so a resumed run shards (and batches) exactly as an uninterrupted one.
    """
    buf: list[PromptItem] = []
    first = 0
    for it in items:
        buf.append(it)
        if len(buf) >= cfg.shard_size:
            yield first, buf
            first += len(buf)
            buf = []
    if buf:
        yield first, buf


def _progress(cfg: ProfileConfig, total: int | None):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="profile", unit="prompt", disable=not cfg.progress, dynamic_ncols=True)
    bar.tokens = 0
    return bar


def run_corpus(
    model: torch.nn.Module,
    tokenizer,
    items: Iterable[PromptItem],
    sink: Callable[[Shard], None],
    config: ProfileConfig | None = None,
    skip: set[str] | frozenset = frozenset(),
    total: int | None = None,
) -> dict:
    """Profile a stream of prompts shard by shard, handing each finished ``Shard`` to ``sink`` (a ``RunWriter``'s
    ``commit``, or a list's ``append``). Prompts whose id is in ``skip`` (already committed) are not run.

    Returns the run's metadata.
    """
    cfg = config or ProfileConfig()
    eng = Engine(model, tokenizer, cfg)
    bar = _progress(cfg, total)
    was_training = model.training
    model.eval()
    threads_before = torch.get_num_threads()
    set_cpu_threads(cfg.threads)  # torch and the Numba pass share one thread count

    def prepare(first: int, window: list[PromptItem]):
        # all tokenizer calls happen here, in one thread: a fast tokenizer is not safe to share across threads
        todo = [it for it in window if it.id not in skip]
        if not todo:
            return len(window), todo, [], []
        token_lists = eng.tokenize(todo, first)
        return len(window) - len(todo), todo, token_lists, eng.decode(np.concatenate(token_lists))

    windows = shard_windows(items, cfg)
    pool = ThreadPoolExecutor(
        1
    )  # tokenises the next shard while the model runs this one (fast tokenizers release the GIL)
    with keep_freed_memory():  # the batches reuse what the last one freed
        try:
            nxt = next(windows, None)
            pending = pool.submit(prepare, *nxt) if nxt else None
            while pending is not None:
                skipped, todo, token_lists, token_text = pending.result()
                nxt = next(windows, None)
                pending = pool.submit(prepare, *nxt) if nxt else None
                if skipped and not bar.disable:  # done, but not now: the rate and ETA count only new prompts
                    bar.n += skipped
                    bar.initial += skipped
                    bar.last_print_n = bar.n
                    bar.refresh()
                if todo:
                    sink(eng.run_shard(todo, token_lists, bar, token_text))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            model.train(was_training)
            set_cpu_threads(threads_before)
    return eng.meta()


def shards_to_profile(meta: dict, shards: Sequence[Shard]) -> Profile:
    """The in-memory ``Profile`` of shards in order (what loading their run directory gives)."""
    arrays: dict[str, np.ndarray] = {}
    acc = None
    t0 = 0
    for sh in shards:
        acc = combine_accum(acc, sh.accum, t0)
        t0 += sh.n_tokens
    arrays.update(acc or {})
    for key in shards[0].per_token if shards else ():  # every per-token column (columns.TOKEN_COLUMNS)
        arrays[key] = np.concatenate([s.per_token[key] for s in shards], axis=TOKEN_AXIS[key])
    lengths = np.concatenate([s.lengths for s in shards], 0)
    arrays["prompts.offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    p0 = 0
    prompts = []
    for sh in shards:
        if sh.vectors is not None:
            for name, v in sh.vectors.items():
                arrays.setdefault(name, []).append(v)
        for i, t in enumerate(sh.thumbs or []):
            arrays[thumb_key(p0 + i)] = t
        for (i, layer, head), m in sh.full.items():
            arrays[full_key(p0 + i, layer, head)] = m
        offs = np.concatenate([[0], np.cumsum(sh.lengths)])
        for i in range(sh.n_prompts):
            prompts.append(
                {
                    "sha256": sh.sha256[i],
                    "n_tokens": int(sh.lengths[i]),
                    "preview": sh.previews[i],
                    "tokens": sh.token_text[offs[i] : offs[i + 1]],
                }
            )
            if sh.spans is not None and sh.spans[i] is not None:  # name -> token pieces, as JSON lists
                prompts[-1]["spans"] = {k: [list(p) for p in v] for k, v in sh.spans[i].items()}
                arrays[span_key(p0 + i)] = sh.span_attn[i]
                if sh.head_scores is not None:  # name -> [Ly][H] (NaN: not defined); a run keeps every prompt's
                    scores = sh.head_scores[i]  # in its prompts table
                    prompts[-1]["scores"] = {sc.name: scores[..., k].tolist() for k, sc in enumerate(HEAD_SCORES)}
        p0 += sh.n_prompts
    for name in list(arrays):
        if isinstance(arrays[name], list):
            arrays[name] = np.concatenate(arrays[name], axis=-1)
    meta = dict(meta)
    if shards and shards[0].lens_vocab is not None:  # decoded lens top-1 tokens (saved in profile.json)
        meta["lens_vocab"] = {str(i): t for sh in shards for i, t in sh.lens_vocab.items()}
    if meta.get("d_ff") is None and NEURON_MAX.key in arrays:
        meta["d_ff"] = int(arrays[NEURON_MAX.key].shape[1])
    return Profile(meta=meta, prompts=prompts, arrays=arrays)


def profile(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    config: ProfileConfig | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    spans: Sequence[dict | None] | None = None,
    **overrides,
) -> Profile:
    """Profile ``model`` on ``prompts`` and return the reduced statistics, in memory.

    Args:
        model: a loaded Hugging Face causal LM of a supported architecture, on any device.
        tokenizer: its tokenizer (special tokens are added as the tokenizer does by default).
        prompts: the texts; each is profiled on its own (batches are padded, padding never enters a statistic).
        config: a ``ProfileConfig``; keyword ``overrides`` replace single fields of it.
        on_batch: called with (prompts done, prompts total) after each shard.
        spans: per prompt its named character spans ``{name: [start, end] | [[start, end], ...]}`` (end exclusive)
            or None: the span attention between them (``Profile.span_attention``, ``stats.span_key``).

    Returns:
        A ``Profile``; merge profiles of the same model with ``Profile.merge``. For a corpus, stream it into a run
        directory instead (``attnscope profile --prompts``, or ``run_corpus`` with a ``store.RunWriter``).
    """
    cfg = dataclasses.replace(config or ProfileConfig(), **overrides)
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    items = prompt_items(prompts, spans=spans)
    shards: list[Shard] = []

    def sink(sh: Shard) -> None:
        shards.append(sh)
        if on_batch is not None:
            on_batch(sum(s.n_prompts for s in shards), len(items))

    meta = run_corpus(model, tokenizer, items, sink, cfg, total=len(items))
    return shards_to_profile(meta, shards)
