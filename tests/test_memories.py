"""FFN key-value memories: the running top-k merges like one pass; promoted tokens equal a full matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_model

from attnscope.profiler.lens import lens_modules
from attnscope.profiler.memories import NeuronTopK, promoted_tokens, top_contexts, write_out_matrix


def _fold_all(acts, k, first=0):
    acc = NeuronTopK.empty(1, acts[0].shape[1], k)
    for x in acts:
        acc.update(0, x, first)
        first += x.shape[0]
    return acc


def test_topk_merge_equals_one_pass():
    a = [torch.randn(n, 40) for n in (7, 3, 12)]  # corpus A in three batches
    b = [torch.randn(n, 40) for n in (2, 9)]  # corpus B
    a[0][2, 5] = b[1][4, 5] = 100.0  # a tie: the earlier token wins in both orders of work
    n_a = sum(x.shape[0] for x in a)
    merged = _fold_all(a, 4).merge(_fold_all(b, 4), token_offset=n_a)
    union = torch.cat(a + b)  # [T, F]
    one = _fold_all([union], 4)
    assert np.array_equal(merged.token, one.token) and np.array_equal(merged.value, one.value)
    val, idx = union.topk(4, dim=0)
    assert np.allclose(one.value[0], val.numpy())
    assert one.token[0, 0, 5] == 2  # the tie went to the first token


def test_ties_past_k_go_to_the_earliest_tokens(rng):
    # the same first token in every prompt (a BOS) gives equal activations: which k of them are kept must not
    # depend on torch.topk's choice among equals, or on how the tokens were cut into batches
    x = torch.from_numpy(rng.standard_normal((50, 30)).astype(np.float32))
    bos = torch.from_numpy(rng.permutation(50)[:20])
    x[bos] = 9.0  # column j: 20 tied maxima, k = 4 of them kept
    x[bos[0], 3] = 10.0  # one column with a clear winner ahead of the ties
    val, idx = top_contexts(x, 4)
    first = torch.sort(bos).values
    assert (val[:, :3] == 9.0).all() and torch.equal(idx[:, 0], first[:4])
    assert idx[0, 3] == bos[0] and torch.equal(idx[1:, 3], first[first != bos[0]][:3])
    batches = _fold_all(list(x.split([13, 7, 30])), 4)
    assert np.array_equal(batches.token, _fold_all([x], 4).token)
    assert np.array_equal(np.sort(batches.token[0, :, 0]), first[:4].numpy())


def test_topk_with_fewer_tokens_than_k():
    acc = _fold_all([torch.randn(2, 3)], 5)
    assert (acc.token[0, 2:] == -1).all() and np.isneginf(acc.value[0, 2:]).all()
    with pytest.raises(ValueError, match="tokens"):
        acc.update(0, torch.randn(2, 4), 0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_promoted_tokens_equal_a_full_matmul(kind, tmp_path):
    model = tiny_model(kind)
    got = promoted_tokens(model, k=5, chunk=16, cache=tmp_path / "promoted.safetensors")
    _, norm, head = lens_modules(model)
    for layer in range(2):
        w_out = write_out_matrix(model, layer).double() * norm.weight.detach().double()[:, None]  # [d, F]
        full = head.weight.detach().double() @ w_out  # [V, F]
        val, idx = full.topk(5, dim=0)
        assert np.array_equal(got["token"][layer], idx.T.numpy())
        assert np.allclose(got["logit"][layer], val.T.numpy(), rtol=1e-4, atol=1e-5)
    # the second call reads the cache
    again = promoted_tokens(model, k=5, cache=tmp_path / "promoted.safetensors")
    assert np.array_equal(again["token"], got["token"])


@pytest.mark.parametrize("T, F", [(1, 20), (37, 300), (300, 130)])
def test_cpu_down_proj_pass_equals_reference_and_topk(T, F, rng):
    pytest.importorskip("numba")
    from attnscope.kernels._cpu_down_proj import down_proj_stats_numba
    from attnscope.kernels.reference import down_proj_stats_ref

    x = torch.from_numpy(rng.standard_normal((T, F)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal((T, 17)).astype(np.float32))
    x[T // 2, 5] = x[0, 5] = 50.0  # a tie for the neuron max: the earlier token
    out = down_proj_stats_numba(x, y, top_k=8, contexts=6)
    ref = down_proj_stats_ref(x, y, top_k=8)
    for name in ("in_norm", "out_norm", "topk_val", "neuron_max", "neuron_sum", "neuron_sumsq"):
        np.testing.assert_allclose(out[name].numpy(), ref[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    assert torch.equal(out["topk_idx"], ref["topk_idx"]) and out["topk_idx"].shape == (T, min(8, F))
    assert torch.equal(out["neuron_argmax"], ref["neuron_argmax"]) and out["neuron_argmax"][5] == 0
    val, idx = top_contexts(x, 6)
    assert torch.equal(out["ctx_value"], val) and torch.equal(out["ctx_index"], idx)
