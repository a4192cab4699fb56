"""Capture through the registered attention implementation against each model's own eager attentions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_KINDS, assert_hist_close, assert_verbose_allclose, near_edge_count, tiny_model

from attnscope.kernels import ATTN_VECTOR_STATS, AttnStatsSpec, KeyRanges
from attnscope.kernels.reference import attn_stats_from_probs_ref, down_proj_stats_ref
from attnscope.profiler import UnsupportedModelError, capture, down_proj_modules, run_with_stats

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
            capture(model, lambda call, seen=seen: seen.__setitem__(call.layer, call)),
        ):
            logits = model(**batch).logits
        assert torch.equal(logits, plain), "taking the lse changed the model's output"
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        for layer, c in seen.items():
            q, k, scaling, window, lse = c.query, c.key, c.scaling, c.window, c.lse
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
    with torch.no_grad(), capture(model, lambda call: seen.append(call.lse)):
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


def test_sdpa_stand_in_installed_once_and_restored_by_the_last_context():
    # two capture contexts that overlap without nesting, each in its own context (as two threads' are): the first
    # to close must not take the stand-in away from the other, and the last restores exactly what was there before
    import contextvars

    sdpa = torch.nn.functional.scaled_dot_product_attention
    a, b = tiny_model("llama"), tiny_model("llama")
    got = []
    ctx_a = capture(a, lambda call: got.append(("a", call.lse is not None)))
    ctx_b = capture(b, lambda call: got.append(("b", call.lse is not None)))
    in_a, in_b = contextvars.Context(), contextvars.Context()
    in_a.run(ctx_a.__enter__)
    in_b.run(ctx_b.__enter__)
    in_a.run(ctx_a.__exit__, None, None, None)
    assert torch.nn.functional.scaled_dot_product_attention is not sdpa  # b still collects
    with torch.no_grad():
        in_b.run(b, torch.randint(0, 100, (1, 5)))
    in_b.run(ctx_b.__exit__, None, None, None)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert got and all(name == "b" and has_lse for name, has_lse in got), got


def test_unsupported_architecture_is_named():
    import transformers as tf

    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'bloom'.*attention interface"):
        run_with_stats(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_padded_batch_equals_one_prompt_at_a_time(rng):
    from helpers import random_text, word_tokenizer

    from attnscope.profiler import profile

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
    from helpers import random_text, word_tokenizer

    from attnscope.profiler import profile

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


# -- which op gives the lse: the selection is plain Python, testable without CUDA (marked cuda: the GPU step of
# benchmarks/gpu_check.sh runs them next to the CUDA tests) --


@pytest.mark.cuda
def test_lse_op_follows_torchs_choice():
    from attnscope.profiler.hooks import SDP_BACKENDS, lse_op

    names = {v: k for k, v in SDP_BACKENDS.items()}
    assert lse_op(names["flash"], "cpu", True, 80) == "_scaled_dot_product_flash_attention_for_cpu"
    assert lse_op(names["math"], "cpu", False, 64) is None
    assert lse_op(names["flash"], "cuda", False, 80) == "_scaled_dot_product_flash_attention"
    assert lse_op(names["efficient"], "cuda", False, 64) == "_scaled_dot_product_efficient_attention"
    assert lse_op(names["cudnn"], "cuda", False, 128) == "_scaled_dot_product_cudnn_attention"
    assert lse_op(names["cudnn"], "cuda", True, 128) is None  # a mask on CUDA: the plain call
    assert lse_op(names["flash"], "cuda", False, 20) is None  # torch would pad d_head 20 to 24 first
    assert lse_op(names["math"], "cuda", False, 64) is None and lse_op(None, "cuda", False, 64) is None
    # the op names exist in this torch (cuDNN's has no CPU kernel, but the schema is registered)
    for backend in ("flash", "efficient", "cudnn"):
        assert hasattr(torch.ops.aten, lse_op(names[backend], "cuda", False, 64))


@pytest.mark.cuda
def test_lse_of_every_op_is_normalised():
    from attnscope.profiler.hooks import normalise_lse

    lse = torch.randn(2, 3, 45)
    assert torch.equal(normalise_lse(lse, 2, 3, 45), lse)  # flash
    padded = torch.cat([lse, torch.full((2, 3, 19), float("inf"))], -1)  # efficient: L rounded up to 32
    assert torch.equal(normalise_lse(padded, 2, 3, 45), lse)
    assert torch.equal(normalise_lse(lse[..., None], 2, 3, 45), lse)  # cuDNN: [B, H, L, 1]
    assert normalise_lse(lse.double(), 2, 3, 45).dtype == torch.float32
    assert normalise_lse(lse, 2, 3, 46) is None and normalise_lse(lse, 3, 2, 45) is None
    assert normalise_lse(lse[..., None].expand(2, 3, 45, 2), 2, 3, 45) is None


@pytest.mark.cuda
def test_lse_from_a_cudnn_shaped_op(monkeypatch):
    # the whole path as it runs on a GPU whose torch picks cuDNN, on the CPU: a stand-in op with cuDNN's signature
    # and lse layout ([B, H, L, 1]); the output is the plain call's, the lse reaches the callback as [B, H, L]
    from attnscope.profiler import hooks

    calls = []

    def fake_cudnn(query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale):
        assert attn_bias is None and compute_log_sumexp and not return_debug_mask
        calls.append(is_causal)
        out = hooks._SDPA(query, key, value, is_causal=is_causal, scale=scale)
        L = query.shape[2]
        s = (query.double() @ key.double().transpose(-1, -2)) * scale  # [B, H, L, L]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        return out, torch.logsumexp(s, -1, keepdim=True).float(), None, None, L, L, None, None, None

    model = tiny_model("gpt_neox")  # first: importing a modeling file registers ops that name the real one
    ids = torch.randint(2, 128, (1, 17))
    with torch.no_grad():
        plain = model(ids).logits
    monkeypatch.setattr(hooks, "sdpa_backend", lambda *a, **k: 3)
    monkeypatch.setattr(hooks, "lse_op", lambda b, dev, mask, d: "_scaled_dot_product_cudnn_attention")
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", fake_cudnn, raising=False)
    seen = {}
    with torch.no_grad(), hooks.lse_sources() as sources:
        with capture(model, lambda call: seen.__setitem__(call.layer, call)):
            assert torch.equal(model(ids).logits, plain)
    assert calls == [True, True] and dict(sources) == {"_scaled_dot_product_cudnn_attention": 2}
    for layer, c in seen.items():
        q, lse = c.query, c.lse
        assert lse is not None and lse.shape == q.shape[:3], f"layer {layer}: lse {None if lse is None else lse.shape}"


@pytest.mark.cuda
def test_lse_sources_say_when_none_did():
    from attnscope.profiler import hooks

    model = tiny_model("llama")
    with torch.no_grad(), hooks.lse_sources() as sources, capture(model, lambda *a: None):
        model(torch.randint(2, 128, (1, 9)))  # CPU: torch picks its flash kernel
    assert dict(sources) == {"_scaled_dot_product_flash_attention_for_cpu": 2}
    with torch.no_grad(), hooks.lse_sources() as sources, capture(model, lambda *a: None):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            model(torch.randint(2, 128, (1, 9)))
    assert dict(sources) == {"none (math kernel on cpu)": 2}


# -- on a GPU (``--device cuda``): each CUDA lse op against the plain call, at Pythia-2.8B's head shapes --

CUDA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_lse_ops_are_bit_identical_to_the_plain_call(device, backend, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnscope.profiler import hooks

    if not device.startswith("cuda"):
        pytest.skip("a CUDA test: pytest --device cuda")
    q, k, v = (torch.randn(2, 32, 1000, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad(), sdpa_kernel(getattr(SDPBackend, backend)):
        if hooks.sdpa_backend(q, k, v, None, 0.0, True) != int(getattr(SDPBackend, backend)):
            pytest.skip(f"torch does not run {backend} on this GPU at d_head {D}")
        plain = hooks._SDPA(q, k, v, is_causal=True)
        out, lse, op = hooks._attention_with_lse(q, k, v, None, 0.0, True, None, False)
    assert op == hooks.lse_op(int(getattr(SDPBackend, backend)), "cuda", False, D), op
    diff = (out.float() - plain.float()).abs().max().item()
    assert torch.equal(out, plain), f"{op}: the output moved by up to {diff} against the plain call"
    s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5  # [B, H, L, L]
    s = s.masked_fill(~torch.ones(1000, 1000, dtype=torch.bool, device=device).tril(), float("-inf"))
    want = torch.logsumexp(s, -1)  # [B, H, L]
    assert lse.shape == (2, 32, 1000) and lse.dtype == torch.float32
    assert_verbose_allclose(lse.double(), want, atol=1e-3, rtol=1e-4, name=f"{op} lse")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gpt_neox", "llama"])
def test_cuda_capture_keeps_the_logits(device, kind):
    # the model's own call on the GPU, in bf16, is bit-identical with the lse taken; which op gave it is printed
    from attnscope.profiler import hooks

    if not device.startswith("cuda"):
        pytest.skip("a CUDA test: pytest --device cuda")
    model = tiny_model(kind).to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(2, 128, (1, 300), device=device)
    with torch.no_grad():
        plain = model(ids).logits
    with torch.no_grad(), hooks.lse_sources() as sources, capture(model, lambda *a: None):
        logits = model(ids).logits
    print(kind, dict(sources))
    assert torch.equal(logits, plain), f"taking the lse changed the logits ({dict(sources)})"


@pytest.mark.parametrize("size", [1, 3, 8, 4096])
def test_mask_functions_are_classified_by_their_pattern(size):
    # transformers' own mask functions, as masking_utils composes them for each layer type
    from transformers import masking_utils as mu

    from attnscope.profiler.hooks import classify_mask_function

    zeros = torch.zeros(2, dtype=torch.long)
    assert classify_mask_function(mu.causal_mask_function, None) == ("full", None, None)
    assert classify_mask_function(mu.sliding_window_causal_mask_function(size), size) == ("sliding", size, None)
    chunked = classify_mask_function(mu.chunked_causal_mask_function(size, zeros), size)
    assert chunked == (("chunked", None, size) if size > 1 else ("sliding", 1, None))  # chunks of 1: a window of 1
    # a window of another size than transformers says, a bidirectional mask: neither
    assert classify_mask_function(mu.sliding_window_causal_mask_function(size + 1), size)[0] == "other"
    assert classify_mask_function(mu.bidirectional_mask_function, None)[0] == "other"
    assert classify_mask_function(mu.sliding_window_bidirectional_mask_function(size), size)[0] == "other"
