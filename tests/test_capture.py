"""Capture through the registered attention implementation against each model's own eager attentions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attnscope.kernels import ATTN_VECTOR_STATS, AttnStatsSpec, KeyRanges
from attnscope.kernels.reference import attn_stats_from_probs_ref, down_proj_stats_ref
from attnscope.profiler import UnsupportedModelError, capture, down_proj_modules, run_with_stats
from helpers import TINY_KINDS, assert_hist_close, assert_verbose_allclose, near_edge_count, tiny_model

SPEC = AttnStatsSpec(bins=128, thumb_size=8)


def _batch(vocab=128, L=23, side="right"):
    ids = torch.randint(2, vocab, (3, L))
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, L - 6 :] = 0
        mask[2, L - 1 :] = 0
    else:
        mask[1, :6] = 0
        mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind, side", [(k, "right") for k in TINY_KINDS] + [("llama", "left"), ("mistral", "left")])
def test_capture_matches_eager_attentions(kind, side):
    model = tiny_model(kind)
    batch = _batch(side=side)
    with torch.no_grad():
        plain = model(**batch).logits
    out, stats = run_with_stats(model, batch, spec=SPEC, block_q=8)  # L = 23: three blocks, the last partial
    assert torch.equal(out.logits, plain), "capturing changed the model's output"
    assert model.config._attn_implementation == "sdpa", "the model's own implementation was not restored"

    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True)
    window = getattr(model.config, "sliding_window", None)
    ranges = KeyRanges.from_attention_mask(batch["attention_mask"], window)
    assert sorted(stats["attn"]) == list(range(len(eager.attentions)))
    for layer, probs in enumerate(eager.attentions):
        ref = attn_stats_from_probs_ref(probs.double(), ranges, SPEC, tokens=batch["input_ids"])
        got = stats["attn"][layer]
        for v in ATTN_VECTOR_STATS:
            assert_verbose_allclose(got[v], ref[v], atol=1e-5, rtol=1e-5, name=f"{kind} layer {layer} {v}")
        assert_verbose_allclose(got["dist"], ref["dist"], atol=1e-5, rtol=1e-5, name="dist")
        assert_verbose_allclose(got["thumb"], ref["thumb"], atol=1e-5, rtol=1e-5, name="thumb")
        vals = probs.double()[ranges.allowed(probs.shape[-1]).expand_as(probs)]
        slack = near_edge_count(vals, SPEC.bins, lambda x: x * SPEC.bins, 1e-2)
        assert_hist_close(got["hist_all"], ref["hist_all"], slack, name="hist_all")


@pytest.mark.parametrize("kind, side", [(k, "right") for k in TINY_KINDS] + [("llama", "left"), ("mistral", "left")])
def test_lse_from_the_forward(kind, side):
    # the sdpa kernel's own lse reaches the callback, equals the log-sum-exp over each row's allowed keys, and
    # taking it leaves the logits bit-identical; an unpadded batch (no mask: is_causal) is checked too
    model = tiny_model(kind)
    for batch in (_batch(side=side), {"input_ids": torch.randint(2, 128, (1, 19))}):
        with torch.no_grad():
            plain = model(**batch).logits
        seen = {}
        with (
            torch.no_grad(),
            capture(model, lambda layer, *args, seen=seen: seen.__setitem__(layer, args)),
        ):
            logits = model(**batch).logits
        assert torch.equal(logits, plain), "taking the lse changed the model's output"
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        for layer, (q, k, scaling, window, lse) in seen.items():
            assert lse is not None, f"{kind} layer {layer}: no lse from the sdpa kernel"
            ranges = KeyRanges.from_attention_mask(mask, window)
            L = q.shape[2]
            kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, H, L, D]
            s = (q.double() @ kk.transpose(-1, -2) * scaling).masked_fill(~ranges.allowed(L), float("-inf"))
            want = torch.logsumexp(s, -1)  # [B, H, L]
            rows = ranges.allowed(L).any(-1).expand_as(want)  # [B, H, L] rows with an allowed key
            assert_verbose_allclose(lse[rows], want[rows], atol=1e-5, rtol=1e-5, name=f"{kind} layer {layer} lse")


def test_no_lse_where_the_backend_gives_none():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    batch = _batch()
    with torch.no_grad():
        plain = model(**batch).logits
    seen = []
    with torch.no_grad(), capture(model, lambda *a: seen.append(a[-1])):
        assert torch.equal(model(**batch).logits, plain)
    assert seen == [None, None]
    _, stats = run_with_stats(model, batch, spec=SPEC, block_q=8)  # the statistics compute the lse themselves
    assert stats["attn"][0]["moments"][:, 1].sum() == pytest.approx(4 * int(batch["attention_mask"].sum()), rel=1e-5)
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


@pytest.mark.parametrize("kind", ["gpt_neox", "llama", "gpt2"])
def test_down_proj_hooks_match_module_io(kind):
    model = tiny_model(kind)
    batch = _batch()
    seen = {}
    mods = down_proj_modules(model)
    assert sorted(mods) == [0, 1]
    handles = [m.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(i, (a[0], o))) for i, m in mods.items()]
    try:
        _, stats = run_with_stats(model, batch, top_k=4)
    finally:
        for h in handles:
            h.remove()
    sel = batch["attention_mask"].bool()
    for layer, (x, y) in seen.items():
        ref = down_proj_stats_ref(x[sel], y[sel], top_k=4)
        for name in ("in_norm", "out_norm", "topk_val", "neuron_max", "neuron_sum", "neuron_sumsq"):
            assert_verbose_allclose(stats["mlp"][layer][name], ref[name], atol=1e-4, rtol=1e-5, name=name)
        assert torch.equal(stats["mlp"][layer]["neuron_argmax"], ref["neuron_argmax"])


def test_hooks_removed_and_implementation_restored_on_error():
    model = tiny_model("llama")

    def boom(*args):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        with capture(model, boom, lambda *a: None):
            model(torch.randint(0, 100, (1, 5)))
    assert model.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 5)))  # still runs normally


def test_unsupported_architecture_is_named():
    import transformers as tf

    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'bloom'.*supports .*gpt_neox.*llama"):
        run_with_stats(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_padded_batch_equals_one_prompt_at_a_time(rng):
    from attnscope.profiler import profile
    from helpers import random_text, word_tokenizer

    model = tiny_model("llama", vocab=200)
    tok = word_tokenizer()
    prompts = [random_text(int(n), rng) for n in rng.integers(5, 40, size=4)]
    one = profile(model, tok, prompts, batch_size=1, spec=SPEC, progress=False, block_q=16)
    many = profile(model, tok, prompts, batch_size=3, spec=SPEC, progress=False, block_q=16)
    assert one.prompts == many.prompts
    for name, a in one.arrays.items():
        b = many.arrays[name]
        if name in ("attn.hist_all", "attn.hist_log"):
            assert np.abs(a - b).sum() <= 0.001 * a.sum() + 4, name  # fp32 rounding moves a few edge values
        elif a.dtype.kind in "iu":
            assert np.array_equal(a, b), name
        else:
            assert_verbose_allclose(a, b, atol=1e-5, rtol=1e-4, name=name)


def test_threads_setting_is_used_and_restored(rng):
    from attnscope.profiler import profile
    from helpers import random_text, word_tokenizer

    model = tiny_model("llama", vocab=200)
    before = torch.get_num_threads()
    seen = []
    prof = profile(
        model,
        word_tokenizer(),
        [random_text(30, rng)],
        spec=SPEC,
        progress=False,
        threads=1,
        on_batch=lambda *a: seen.append(torch.get_num_threads()),
    )
    assert seen == [1] and torch.get_num_threads() == before
    assert prof.arrays["attn.moments"][..., 1] == pytest.approx(30, rel=1e-5)  # every row sums to one
    with pytest.raises(ValueError, match="threads must be >= 1"):
        profile(model, word_tokenizer(), ["the cat"], threads=0)
