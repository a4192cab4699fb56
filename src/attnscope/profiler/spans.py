"""Named spans of a prompt: from characters to tokens, and their span-to-span attention per layer and head.

A corpus row may name character spans (``{"needle": [s, e], "context": [[s, e], [s, e]]}``, ``e`` exclusive). A
token belongs to a span when its characters overlap it (the tokenizer's offsets; special tokens hold none). The
kernels pool p over the cells the spans cut (``kernels.contract.pool_layout``) and return, per prompt,
[H, Sq, Sk, 2] (mass, top1) over the query spans (every named span, then ``last``) and key spans (every named
span); this module gathers them over the layers into one [Ly, H, Sq, Sk, 2] float32 array per prompt;
``data.span_rows`` lays them out as the rows of the run's ``spans`` table (the ``span_attention`` SQL view).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from attnscope.kernels.contract import validate_spans
from attnscope.kernels.stats import ANSWER_SPAN, ARGMAX, FIRST_TOKEN_ROWS, HEAD_SCORES, NEEDLE_SPAN, SINK

from .config import PromptError

__all__ = ["char_spans_to_tokens", "fold_layer_spans", "head_scores", "token_spans"]


def char_spans_to_tokens(
    spans: Mapping[str, Sequence[tuple[int, int]]], offsets: Sequence[tuple[int, int]], where: str
) -> dict[str, tuple[tuple[int, int], ...]]:
    """Character pieces [s, e) -> token pieces [a, b) of the tokens whose characters overlap them; ``PromptError``
    naming ``where`` when a span covers no token."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = off[:, 1] > off[:, 0]  # special tokens have no characters
    out: dict[str, list[tuple[int, int]]] = {}
    for name, pieces in spans.items():
        got = []
        for s, e in pieces:
            hit = np.flatnonzero(real & (off[:, 0] < e) & (off[:, 1] > s))
            if hit.size:
                got.append((int(hit[0]), int(hit[-1]) + 1))  # offsets rise with the tokens: one run
        if not got:
            raise PromptError(f"{where}: span {name!r} covers no token (characters {list(pieces)})")
        out[name] = got
    try:
        return validate_spans(out, len(off), where)
    except ValueError as e:
        raise PromptError(str(e)) from None


def token_spans(tokenizer, items: Sequence, lock: threading.Lock, token_lists: Sequence[np.ndarray]) -> list:
    """Per item its spans in tokens (``char_spans_to_tokens``), or None for an item without spans; the offsets come
    from tokenising the items with spans once more (a fast tokenizer's ``return_offsets_mapping``)."""
    out: list = [None] * len(items)
    todo = [n for n, it in enumerate(items) if getattr(it, "spans", None)]
    if not todo:
        return out
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError("named spans need a fast tokenizer (its character offsets); this one is not")
    with lock:
        enc = tokenizer([items[n].text for n in todo], add_special_tokens=True, return_offsets_mapping=True)
    for n, ids, offsets in zip(todo, enc["input_ids"], enc["offset_mapping"]):
        where = f"prompt {items[n].id!r}"
        if len(ids) != len(token_lists[n]):
            raise PromptError(f"{where}: its offsets do not match its tokens ({len(ids)} vs {len(token_lists[n])})")
        out[n] = char_spans_to_tokens(items[n].spans, offsets, where)
    return out


def fold_layer_spans(per_prompt: list, layer_out: list | None, layer: int, Ly: int) -> None:
    """Put one layer's span attention (per batch row [H, Sq, Sk, 2] or None) into ``per_prompt`` (per batch row
    [Ly, H, Sq, Sk, 2] float32, allocated at the first layer)."""
    for b, s in enumerate(layer_out or ()):
        if s is None:
            continue
        a = s.numpy() if hasattr(s, "numpy") else np.asarray(s)
        if per_prompt[b] is None:
            per_prompt[b] = np.zeros((Ly,) + a.shape, np.float32)
        per_prompt[b][layer] = a


def head_scores(vec: np.ndarray, ids: np.ndarray, lengths: np.ndarray, spans: Sequence | None) -> np.ndarray:
    """[B, Ly, H, len(HEAD_SCORES)] float64 scores of each prompt of a batch (right-padded: prompt b is positions
    [0, lengths[b])) from its vectors ``vec`` [V, Ly, B, H, Lmax], token ids [B, Lmax] and spans in tokens.

    - retrieval (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"), teacher-forced:
      the gold answer follows the prompt; the row i before answer token i + 1 copies from the needle when its
      largest weight falls on a needle key j holding that very token, tok_j = tok_{i+1}; the score is the share of
      answer tokens so copied (NaN for a prompt without ``needle`` and ``answer`` spans);
    - first_token (Gu et al. 2025, "When Attention Sink Emerges in Language Models"): the mean attention to the
      first token over the first T = 64 rows; the sink rate is the share of heads above 0.3.
    """
    _, Ly, B, H, _ = vec.shape
    out = np.full((B, Ly, H, len(HEAD_SCORES)), np.nan)
    for b in range(B):
        n = int(lengths[b])
        t = min(FIRST_TOKEN_ROWS, n)
        out[b, :, :, 1] = vec[SINK.slot, :, b, :, :t].astype(np.float64).mean(-1)
        sp = spans[b] if spans is not None else None
        if not sp or NEEDLE_SPAN not in sp or ANSWER_SPAN not in sp:
            continue
        needle = np.zeros(n, bool)
        for s, e in sp[NEEDLE_SPAN]:
            needle[s:e] = True
        targets = np.array([i for s, e in sp[ANSWER_SPAN] for i in range(max(s, 1), e)], np.int64)  # answer tokens
        if targets.size == 0:
            continue
        rows = targets - 1  # the rows that predict them
        am = vec[ARGMAX.slot, :, b, :, :][..., rows].astype(np.int64)  # [Ly, H, n_answer] relative = absolute
        hit = needle[am] & (ids[b][am] == ids[b][targets])
        out[b, :, :, 0] = hit.mean(-1)
    return out
