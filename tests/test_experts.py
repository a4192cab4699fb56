"""The neurons of mixture-of-experts blocks, on the conformance sweep's tiny MoE models: the activations attnscope
recomputes from the fused experts' weights are the ones the model's experts use (their down projection, weighted
and summed, gives the experts module's own output), and a profile's expert-neuron accumulators and per-token
statistics equal a float64 reduction of them over the tokens routed to each expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_verbose_allclose, word_tokenizer
from test_architectures import PROMPTS, SWEEP, build_model

MOE = [t for t in SWEEP if t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "llama4_text")] + [
    "deepseek_v3",
    "granitemoe",
    "dots1",
    "qwen3_next",
]


def _experts_modules(model) -> dict[int, torch.nn.Module]:
    base = model.model if model.base_model is model else model.base_model
    out = {}
    for i, layer in enumerate(base.layers):
        block = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None) or layer.block_sparse_moe
        if hasattr(block, "experts"):
            out[i] = block.experts
    return out


def _down(ex, e: int, a: torch.Tensor) -> torch.Tensor:
    """Expert e's down projection of its activations a [n, Fe], as its modeling file applies it."""
    w = ex.down_proj[e]
    y = a @ w if w.shape[0] == a.shape[-1] and getattr(ex, "is_transposed", True) else a @ w.T
    if getattr(ex, "has_bias", False):
        y = y + ex.down_proj_bias[e]
    return y


def _captured(model, ids: torch.Tensor):
    """(layer -> (experts [L, k], weights [L, k], acts [L, k, Fe]), layer -> experts module output) of one prompt."""
    from attnscope.profiler.hooks import capture

    got, outs, handles = {}, {}, []
    for i, ex in _experts_modules(model).items():
        handles.append(ex.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
    try:
        with torch.no_grad(), capture(model, lambda call: None, None, lambda *a: got.__setitem__(a[0], a[1:]), True):
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return got, outs


@pytest.mark.parametrize("model_type", MOE)
def test_recomputed_expert_activations_give_the_experts_output(model_type):
    torch.set_num_threads(1)
    model = build_model(model_type)
    ids = torch.tensor([word_tokenizer()(PROMPTS[0])["input_ids"]])
    got, outs = _captured(model, ids)
    experts = _experts_modules(model)
    assert got and set(got) == set(outs), "every MoE layer reports its routing and activations"
    for layer, (idx, w, acts) in got.items():
        ex = experts[layer]
        N, k = idx.shape
        assert acts.shape[:2] == (N, k) and acts.shape[2] > 0
        assert acts.abs().amax() > 0
        y = torch.zeros(N, ex.down_proj.shape[-1] if ex.down_proj.shape[1] == acts.shape[2] else ex.down_proj.shape[1])
        for t in range(N):
            for s in range(k):
                e = int(idx[t, s])
                contrib = _down(ex, e, acts[t, s][None])[0]
                y[t] += contrib if model_type == "llama4_text" else contrib * w[t, s]  # Llama-4 scales the input
        want = outs[layer]
        if model_type == "llama4_text":  # each expert's copy of the tokens: [E * N, d], summed over the experts
            want = want.reshape(-1, N, want.shape[-1]).sum(0)
        assert_verbose_allclose(y.double(), want.double(), atol=1e-5, rtol=1e-4, name=f"{model_type} L{layer}")


@pytest.mark.parametrize("model_type", ["qwen2_moe", "gpt_oss", "llama4_text"])
def test_profile_expert_neurons_equal_a_float64_reduction(model_type):
    from attnscope.profiler import profile

    torch.set_num_threads(1)
    tok = word_tokenizer()
    model = build_model(model_type)
    c = 3
    prof = profile(model, tok, PROMPTS, batch_size=2, neuron_contexts=c, top_k=5, progress=False)
    E = prof.meta["n_experts"]
    per_layer: dict[int, list] = {}
    offset = 0
    for text in PROMPTS:  # one prompt at a time, unpadded: the run's tokens in order
        ids = torch.tensor([tok(text)["input_ids"]])
        got, _ = _captured(model, ids)
        for layer, (idx, _, acts) in got.items():
            per_layer.setdefault(layer, []).append((idx, acts.double(), offset))
        offset += ids.shape[1]
    a = prof.arrays
    assert a["mlp.expert_neuron_max"].shape[1:3] == (E, prof.meta["expert_dim"])
    for layer, parts in per_layer.items():
        idx = torch.cat([p[0] for p in parts])
        acts = torch.cat([p[1] for p in parts])  # [T, k, Fe]
        T, k, Fe = acts.shape
        flat = acts.reshape(T, -1)  # per token: its chosen experts' neurons
        assert_verbose_allclose(a["mlp.in_norm"][layer], flat.norm(dim=1), atol=1e-4, rtol=1e-4, name="in_norm")
        val, pos = flat.topk(5, dim=1)
        neuron = idx.gather(1, pos // Fe) * Fe + pos % Fe
        assert np.array_equal(a["mlp.topk_idx"][layer], neuron.numpy()), f"{model_type} L{layer} top neurons"
        assert_verbose_allclose(a["mlp.topk_val"][layer], val, atol=1e-5, rtol=1e-5, name="top values")
        for e in range(E):
            t, s = torch.where(idx == e)
            assert a["mlp.expert_tokens"][layer, e] == len(t)
            if len(t) == 0:
                assert np.isneginf(a["mlp.expert_neuron_max"][layer, e]).all()
                continue
            x = acts[t, s]  # [n_e, Fe]: expert e's neurons on its tokens
            assert_verbose_allclose(a["mlp.expert_neuron_sum"][layer, e], x.sum(0), atol=1e-4, rtol=1e-5, name="sum")
            assert_verbose_allclose(
                a["mlp.expert_neuron_sumsq"][layer, e], (x * x).sum(0), atol=1e-4, rtol=1e-5, name="sumsq"
            )
            mx, arg = x.max(0)
            assert_verbose_allclose(a["mlp.expert_neuron_max"][layer, e], mx, atol=1e-5, rtol=1e-5, name="max")
            assert np.array_equal(a["mlp.expert_neuron_argmax"][layer, e], t[arg].numpy())
            v, order = torch.sort(x, dim=0, descending=True, stable=True)
            n = min(c, len(t))
            assert_verbose_allclose(a["mlp.expert_ctx_value"][layer, e, :n], v[:n], atol=1e-5, rtol=1e-5, name="ctx")
            assert np.array_equal(a["mlp.expert_ctx_token"][layer, e, :n], t[order[:n]].numpy())
            assert (a["mlp.expert_ctx_token"][layer, e, n:] == -1).all()


def test_expert_neuron_accumulators_fold_alike_over_batches_and_merged_runs():
    # one prompt a batch, both in one batch, and two one-prompt profiles combined: the same accumulators
    from attnscope.kernels.stats import ACCUM_KEYS
    from attnscope.profiler import profile
    from attnscope.profiler.accum import Accumulator

    torch.set_num_threads(1)
    tok, model = word_tokenizer(), build_model("olmoe")
    kw = dict(neuron_contexts=4, progress=False)
    one = profile(model, tok, PROMPTS, batch_size=1, **kw)
    both = profile(model, tok, PROMPTS, batch_size=2, **kw)
    a = profile(model, tok, PROMPTS[:1], **kw)
    b = profile(model, tok, PROMPTS[1:], **kw)
    merged = Accumulator(dict(a.arrays)).combine(dict(b.arrays), a.n_tokens)
    keys = [k for k in ACCUM_KEYS if k.startswith("mlp.expert_")]
    assert len(keys) == 8 and all(k in one.arrays for k in keys)
    for key in keys:
        for other, name in ((both, "one batch"), (merged, "merged")):
            x, y = np.asarray(one.arrays[key]), np.asarray(other[key] if name == "merged" else other.arrays[key])
            if x.dtype.kind == "f":
                assert np.allclose(x, y, atol=1e-5, rtol=1e-6), f"{key}: {name}"
            else:
                assert np.array_equal(x, y), f"{key}: {name}"
