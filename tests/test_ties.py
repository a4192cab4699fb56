"""One tie rule for every maximum and top-k over tokens: the lower token index in the run (earliest prompt, then
position), so the kernels, the per-shard fold and merge agree exactly, exact ties included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_text

from attnscope.cli import main
from attnscope.kernels._cpu_fused import HAS_NUMBA
from attnscope.kernels.reference import down_proj_stats_ref
from attnscope.profiler import load
from attnscope.profiler.data import combine_accum, topk_fold
from attnscope.profiler.memories import top_contexts

K = 4  # contexts kept per neuron
IMPLS = ["reference", pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba missing"))]


def _stats(x: torch.Tensor, impl: str) -> dict[str, np.ndarray]:
    y = torch.zeros(x.shape[0], 3)
    if impl == "numba":
        from attnscope.kernels._cpu_down_proj import down_proj_stats_numba

        st = down_proj_stats_numba(x, y, top_k=3, contexts=K)
    else:
        st = down_proj_stats_ref(x, y, top_k=3, upcast=False)
        st["ctx_value"], st["ctx_index"] = top_contexts(x, K)
    return {k: v.numpy() for k, v in st.items()}


def _expected(x: np.ndarray) -> dict[str, np.ndarray]:
    """The rule, spelled out: values descending, ties to the lower row (token) / the lower neuron."""
    order = np.lexsort((np.arange(x.shape[0])[:, None].repeat(x.shape[1], 1), -x), axis=0)  # [T, F]
    kc = min(K, x.shape[0])
    top = np.lexsort((np.arange(x.shape[1])[None, :].repeat(x.shape[0], 0), -np.abs(x)), axis=1)[:, :3]
    return {
        "neuron_max": x.max(0),
        "neuron_argmax": order[0],
        "ctx_index": order[:kc],
        "ctx_value": np.take_along_axis(x, order[:kc], 0),
        "topk_idx": top,
    }


def _tied(rng, T=40, F=24) -> np.ndarray:
    """Activations with many exact ties: small integers (exact in float32), some rows repeated."""
    x = rng.integers(-3, 4, size=(T, F)).astype(np.float32)
    x[rng.integers(0, T, size=T // 4)] = x[rng.integers(0, T, size=T // 4)]
    return x


@pytest.mark.parametrize("impl", IMPLS)
def test_down_proj_kernels_break_ties_to_the_earlier_token_and_lower_neuron(impl, rng):
    x = _tied(rng)
    got, want = _stats(torch.from_numpy(x), impl), _expected(x)
    if impl == "reference":  # top_contexts picks the set by the rule, in torch.topk's order: the fold sorts it
        o = np.lexsort((got["ctx_index"], -got["ctx_value"]), axis=0)
        got["ctx_index"], got["ctx_value"] = (np.take_along_axis(got[n], o, 0) for n in ("ctx_index", "ctx_value"))
    for name, w in want.items():
        assert np.array_equal(got[name], w), name


def _accum(x: np.ndarray, impl: str) -> dict[str, np.ndarray]:
    """The accumulators of one block of tokens (one shard), as the profiler keeps them: [1, ...] per layer."""
    st = _stats(torch.from_numpy(x), impl)
    empty = np.full((K, x.shape[1]), -np.inf, np.float32), np.full((K, x.shape[1]), -1, np.int64)
    val, tok = topk_fold(*empty, st["ctx_value"], st["ctx_index"])  # as the profiler folds a batch in
    return {
        "mlp.neuron_max": st["neuron_max"][None].astype(np.float32),
        "mlp.neuron_argmax": st["neuron_argmax"][None],
        "mlp.neuron_sum": st["neuron_sum"][None],
        "mlp.neuron_sumsq": st["neuron_sumsq"][None],
        "mlp.ctx_value": val[None],
        "mlp.ctx_token": tok[None],
    }


def _fold(blocks: list[np.ndarray], impl: str, base: int = 0):
    acc, t0 = None, base
    for b in blocks:
        acc = combine_accum(acc, _accum(b, impl), t0)
        t0 += b.shape[0]
    return acc


@pytest.mark.parametrize("impl", IMPLS)
def test_fold_and_merge_equal_one_pass_on_exact_ties(impl, rng):
    """Shards folded one by one, and two runs merged with their token offset, equal one pass over all tokens."""
    x = _tied(rng, T=60)
    cuts = np.sort(rng.choice(np.arange(1, 60), size=7, replace=False))
    blocks = np.split(x, cuts)
    one = _accum(x, impl)
    folded = _fold(blocks, impl)
    a, b = blocks[:3], blocks[3:]
    merged = combine_accum(_fold(a, impl), _fold(b, impl), sum(len(t) for t in a))
    for name in ("mlp.neuron_max", "mlp.neuron_argmax", "mlp.ctx_value", "mlp.ctx_token"):
        assert np.array_equal(folded[name], one[name]), name
        assert np.array_equal(merged[name], one[name]), name


def test_combine_accum_gives_a_tie_to_the_lower_token_on_either_side():
    a = {"mlp.neuron_max": np.array([[2.0, 2.0, 1.0]], np.float32), "mlp.neuron_argmax": np.array([[9, 1, 9]])}
    b = {"mlp.neuron_max": np.array([[2.0, 2.0, 1.0]], np.float32), "mlp.neuron_argmax": np.array([[0, 5, 0]])}
    out = combine_accum(a, b, 4)  # b's tokens are 4, 9, 4 in the run
    assert out["mlp.neuron_argmax"].tolist() == [[4, 1, 4]]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def test_merge_equals_one_run_on_exact_ties(model_dir, tmp_path, rng):
    """Prompts that share their first token tie exactly there, and a prompt twice ties at every position; B's short
    prompts come after A's in the run but first in a length-sorted batch. Every batch is padded to the same length
    in the three runs (B holds a copy of A's longest prompt): a token's activations then do not depend on the run."""
    ta = ["the " + random_text(int(k), rng) for k in rng.integers(3, 15, size=4)]
    tb = ["the", "the", "the cat", max(ta, key=lambda t: len(t.split()))]
    a, b, ab = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "ab.jsonl"
    a.write_text("".join(json.dumps({"id": f"a{i}", "text": t}) + "\n" for i, t in enumerate(ta)))
    b.write_text("".join(json.dumps({"id": f"b{i}", "text": t}) + "\n" for i, t in enumerate(tb)))
    ab.write_text(a.read_text() + b.read_text())
    for c, out in ((a, "ra"), (b, "rb"), (ab, "rab")):  # one batch each: A's prompts padded alike in ra and rab
        argv = ["profile", str(model_dir), "--prompts", str(c), "--out", str(tmp_path / out), "--bins", "64"]
        argv += ["--top-k", "3", "--shard-size", "16", "--batch-size", "16", "--keep", "tables", "--no-progress"]
        assert main(argv) == 0
    assert main(["merge", str(tmp_path / "ra"), str(tmp_path / "rb"), "--out", str(tmp_path / "m")]) == 0
    m, one = load(tmp_path / "m"), load(tmp_path / "rab")
    for name in ("mlp.neuron_max", "mlp.ctx_value", "mlp.neuron_argmax", "mlp.ctx_token"):
        assert np.array_equal(m.arrays[name], one.arrays[name]), name


def test_topk_fold_skips_only_columns_that_cannot_change():
    """A fold re-sorts only the columns where a candidate reaches the current k-th value; it must give what one
    sort of both candidate sets gives, ties (to the earlier token) included, on shapes with leading axes."""
    rng = np.random.default_rng(7)

    def full_sort(v, t):  # the definition: larger values first, ties to the earlier token, -1 (none) last
        late = np.where(t < 0, np.iinfo(np.int64).max, t)
        order = np.lexsort((late, -v), axis=-2)
        return np.take_along_axis(v, order, -2), np.take_along_axis(t, order, -2)

    for shape, k_new in [((8, 50), 8), ((3, 8, 40), 5), ((2, 4, 30), 4)]:
        for trial in range(20):
            v, t = full_sort(rng.integers(0, 6, shape).astype(np.float32), rng.integers(-1, 100, shape))
            new_shape = (*shape[:-2], k_new, shape[-1])
            nv = rng.integers(0, 8 if trial % 2 else 3, new_shape).astype(np.float32)  # few or many columns change
            nv, nt = full_sort(nv, rng.integers(0, 200, new_shape))
            got = topk_fold(v, t, nv, nt)
            want = [a[..., : shape[-2], :] for a in full_sort(np.concatenate([v, nv], -2), np.concatenate([t, nt], -2))]
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (shape, trial)
