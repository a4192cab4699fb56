"""``Accumulator``: the accumulators of a set of prompts (``stats.ACCUMULATORS``), allocated, folded and combined by
what each one declares (numpy only).

A ``sum`` accumulator adds; a ``max`` keeps the largest value with the token holding it (its ``companion``); a
``topk`` keeps the k largest values along axis -2 with their tokens. Ties go to the lower token index in the run
(the earliest prompt, then position), whichever side holds it, as everywhere a maximum or top-k over tokens is kept:
so folding batches one by one, folding shards one by one and merging runs all equal one pass over the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from attnscope.kernels.stats import ACCUM_KEYS, ACCUMULATORS, Accum

__all__ = ["ACCUM", "Accumulator", "combine_accum", "topk_fold"]

ACCUM: dict[str, Accum] = {a.key: a for a in ACCUMULATORS}
_COMPANION_OF = {a.companion: a for a in ACCUMULATORS if a.companion}


def topk_fold(
    value: np.ndarray, token: np.ndarray, new_value: np.ndarray, new_token: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (k = value.shape[-2]) of two candidate sets along axis -2: arrays [..., k, F] and [..., k', F]
    of values and global token indices (-1: none). Larger values first, ties to the earlier token, so folding
    batches one by one or merging two runs gives the same result as one pass."""
    k = value.shape[-2]
    if value.shape[-2] and new_value.shape[-2] and value.size:
        # only the columns where a candidate reaches the k-th value can change (after the first batches, few)
        cols = new_value.max(axis=-2) >= value.min(axis=-2)  # [..., F]
        if not cols.all():
            v, t = value.copy(), token.copy()
            sel = np.nonzero(cols)  # the (..., F) indices of the columns that may change
            if len(sel[0]):
                part = [np.moveaxis(a, -2, -1)[sel].T for a in (value, token, new_value, new_token)]  # [k, n]
                pv, pt = topk_fold(*part)
                np.moveaxis(v, -2, -1)[sel], np.moveaxis(t, -2, -1)[sel] = pv.T, pt.T
            return v, t
    v = np.concatenate([value, new_value], axis=-2)
    t = np.concatenate([token, new_token], axis=-2)
    late = np.where(t < 0, np.iinfo(np.int64).max, t)
    order = np.lexsort((late, -v), axis=-2)[..., :k, :]
    return np.take_along_axis(v, order, -2), np.take_along_axis(t, order, -2)


def _max_fold(
    value: np.ndarray, token: np.ndarray, new_value: np.ndarray, new_token: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise the larger value and its token; a tie keeps the lower token index."""
    take = (new_value > value) | ((new_value == value) & (new_token < token))
    return np.where(take, new_value, value), np.where(take, new_token, token)


def _shifted(accum: Accum, token: np.ndarray, offset: int) -> np.ndarray:
    """A companion's token indices counted ``offset`` tokens later (-1, "none", stays)."""
    return np.where(token >= 0, token + offset, -1) if accum.fold == "topk" else token + offset


class Accumulator(Mapping):
    """The accumulators of a set of prompts, keyed by their ``Profile`` names (a read-only mapping of arrays).

    ``allocate`` creates the named ones from the run's dimensions, ``fold`` adds one batch's (or layer's) values by
    each one's rule, ``combine`` gives the accumulators of two disjoint prompt sets.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray] | None = None):
        self.arrays: dict[str, np.ndarray] = dict(arrays or {})

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    def allocate(self, dims: Mapping[str, int], *accums: Accum) -> Accumulator:
        """Create each of ``accums`` (and its companion) that is not there yet, shaped by ``dims`` (Ly, H, bins, R,
        V, F, k): sums at 0, maxima and top-k at -inf with no token (-1; 0 for a max, which always has one)."""
        for a in accums:
            for acc in (a, ACCUM[a.companion]) if a.companion else (a,):
                if acc.key in self.arrays:
                    continue
                shape = tuple(int(dims[d]) if not d.isdigit() else int(d) for d in acc.shape)
                if acc.fold in ("max", "topk"):
                    fill = -np.inf
                elif acc.fold == "companion":
                    fill = -1 if _COMPANION_OF[acc.key].fold == "topk" else 0
                else:
                    fill = 0
                self.arrays[acc.key] = np.full(shape, fill, dtype=acc.dtype)
        return self

    def fold(self, accum: Accum, value: np.ndarray, token: np.ndarray | None = None, at=()) -> None:
        """Fold ``value`` into ``accum`` (at index ``at``, e.g. one layer): a sum adds it, a max or a top-k also
        takes ``token``, the run index of the token behind each value."""
        a = self.arrays
        if accum.fold == "sum":
            a[accum.key][at] += value
            return
        comp = accum.companion
        fold = _max_fold if accum.fold == "max" else topk_fold
        a[accum.key][at], a[comp][at] = fold(a[accum.key][at], a[comp][at], value, token)

    def combine(self, other: Mapping[str, np.ndarray], other_token_offset: int) -> Accumulator:
        """The accumulators of both prompt sets, ``other``'s tokens numbered after ``other_token_offset`` tokens
        (what ``other`` lacks, or this one lacks, is left out: the two come from the same settings)."""
        return Accumulator(combine_accum(self.arrays or None, other, other_token_offset))


def combine_accum(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray], b_token_offset: int) -> dict:
    """The accumulators of two disjoint prompt sets, ``b``'s tokens numbered after ``b_token_offset`` tokens
    (``a`` None: ``b``'s alone, renumbered); each by its declared fold (see the module docstring)."""
    if a is None:
        out = {k: np.array(v, copy=True) for k, v in b.items() if k in ACCUM}
        for k in list(out):
            if k in _COMPANION_OF:
                out[k] = _shifted(_COMPANION_OF[k], out[k], b_token_offset)
        return out
    out: dict[str, np.ndarray] = {}
    for key in ACCUM_KEYS:
        acc = ACCUM[key]
        if key not in a or key not in b or acc.fold == "companion":
            continue
        if acc.fold == "sum":
            out[key] = a[key] + b[key]
            continue
        fold = _max_fold if acc.fold == "max" else topk_fold
        tb = _shifted(acc, b[acc.companion], b_token_offset)
        out[key], out[acc.companion] = fold(a[key], a[acc.companion], b[key], tb)
    return out
