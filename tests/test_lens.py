"""The logit lens against a direct computation with every layer's full logits, for each tiny architecture."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_KINDS, assert_verbose_allclose, tiny_model

from attnscope.kernels.reference import vocab_stats_ref
from attnscope.profiler.lens import LENS_FIELDS, lens_modules, logit_lens, next_token_targets


def _batch(vocab=128, B=2, L=19):
    ids = torch.randint(0, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 5 :] = 0  # a shorter second prompt
    return {"input_ids": ids, "attention_mask": mask}


def test_next_token_targets():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, 8, -1], [2, -1, -1, -1]]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_lens_matches_full_logits(kind):
    model = tiny_model(kind)
    batch = _batch()
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True)
    out, lens = logit_lens(model, batch, impl="torch")
    assert torch.equal(out.logits, plain.logits), "the lens changed the model's output"
    _, norm, head = lens_modules(model)
    sel = batch["attention_mask"].bool()
    target = next_token_targets(batch["input_ids"], batch["attention_mask"])[sel]
    n_layers = len(plain.hidden_states) - 1
    assert all(lens[f].shape == (n_layers, int(sel.sum())) for f in LENS_FIELDS)
    for layer in range(n_layers):
        if layer < n_layers - 1:  # hidden_states[l + 1] is layer l's output, before the final norm
            with torch.no_grad():
                h = norm(plain.hidden_states[layer + 1][sel])
        else:  # the last entry already went through the final norm: the model's own logits
            h = plain.hidden_states[-1][sel]
        bias = getattr(head, "bias", None)
        ref = vocab_stats_ref(h, head.weight.detach(), target, None if bias is None else bias.detach())
        for f in ("top_prob", "entropy", "target_prob"):
            assert_verbose_allclose(lens[f][layer], ref[f], atol=1e-5, rtol=1e-4, name=f"{kind} layer {layer} {f}")
        assert torch.equal(lens["top_id"][layer], ref["top_id"])
        logits = h.double() @ head.weight.detach().double().T + (0 if bias is None else bias.detach().double())
        final = torch.softmax(logits, -1).gather(-1, plain.logits[sel].argmax(-1, keepdim=True)).squeeze(-1)
        assert_verbose_allclose(lens["final_prob"][layer], final, atol=1e-5, rtol=1e-4, name=f"{kind} final_prob")
    # the last layer's lens is the model's own next-token distribution
    logp = torch.log_softmax(plain.logits[sel].double(), -1)
    assert_verbose_allclose(lens["entropy"][-1], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-4, name="entropy")


def test_lens_memory_is_bounded_by_the_chunk():
    # a vocabulary of 4096 and 64 rows with a budget of 2^12 logits: chunks of 256 columns, never [T, V]
    from attnscope.kernels import vocab_stats_torch as vst
    from attnscope.profiler.lens import vocab_stats

    h, w = torch.randn(64, 32), torch.randn(4096, 32)
    target = torch.randint(0, 4096, (64,))
    seen = []
    orig = vst.linear

    def spy(*a):
        r = orig(*a)
        seen.append(tuple(r.shape))
        return r

    vst.linear = spy
    try:
        out = vocab_stats(h, w, target, impl="torch", budget=1 << 12)
    finally:
        vst.linear = orig
    assert seen and max(a * b for a, b in seen) <= 64 * 256
    ref = vocab_stats_ref(h, w, target)
    assert_verbose_allclose(out["entropy"], ref["entropy"], atol=1e-5, rtol=1e-4, name="entropy")
