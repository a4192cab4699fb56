"""Test helpers: verbose allclose, histogram comparison with a bin-edge allowance, tiny HF models."""

from __future__ import annotations

import numpy as np
import torch


def assert_verbose_allclose(actual, expected, atol=1e-5, rtol=1e-5, name=""):
    """allclose that says how many elements mismatch, where, and whether NaN/inf disagree."""
    a = torch.as_tensor(np.asarray(actual) if not torch.is_tensor(actual) else actual).double().cpu()
    e = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected).double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN mismatch at {torch.nonzero(nan_a ^ nan_e)[:5].tolist()}"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{name}: inf mismatch"
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        worst = (a - e).abs()[bad].max().item()
        pairs = [(i, a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}), max abs diff "
            f"{worst:.3g}; first (index, actual, expected): {pairs}"
        )


def near_edge_count(values: torch.Tensor, bins: int, to_bin_coord, tol: float) -> int:
    """How many values lie within ``tol`` (in bin units) of a bin edge after ``to_bin_coord``."""
    x = to_bin_coord(values.double())
    x = x[torch.isfinite(x) & (x > 0) & (x < bins)]
    frac = x - x.floor()
    return int(((frac < tol) | (frac > 1 - tol)).sum())


def assert_hist_close(actual, expected, slack: int, name=""):
    """Two histograms of the same values agree up to ``slack`` values that moved to a neighbouring bin.

    A value within rounding of a bin edge may land on either side in fp32 vs fp64, so the counts must have the
    same total, and every prefix sum may differ by at most the number of such values (each move shifts a
    prefix sum by one).
    """
    a = torch.as_tensor(actual).long().cpu()
    e = torch.as_tensor(expected).long().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(a.sum(-1), e.sum(-1)), f"{name}: totals differ {a.sum(-1).tolist()} vs {e.sum(-1).tolist()}"
    drift = (a.cumsum(-1) - e.cumsum(-1)).abs().max().item()
    assert drift <= slack, f"{name}: prefix sums differ by {drift} > {slack} values near bin edges"


def tiny_model(kind: str, seed: int = 0, vocab: int = 128):
    """A tiny random-init HF causal LM built from a config (no download)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt_neox":  # Pythia's shape in miniature: d_head 80, rotary_pct 0.25
        cfg = tf.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=160,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            rotary_pct=0.25,
            max_position_embeddings=256,
        )
        cls = tf.GPTNeoXForCausalLM
    elif kind == "llama":  # GQA: 4 heads, 2 KV heads
        cfg = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        cls = tf.LlamaForCausalLM
    elif kind == "mistral":  # sliding window shorter than the prompts
        cfg = tf.MistralConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=7,
            max_position_embeddings=256,
        )
        cls = tf.MistralForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        cls = tf.Qwen2ForCausalLM
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
        )
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(kind)
    return cls(cfg).eval()


TINY_KINDS = ["gpt_neox", "llama", "mistral", "qwen2", "gpt2"]


WORDS = (
    "the of and to in is was for on that with as by at from his her an which were are this be had it not or "
    "have one but all they she he we you there their what so up out if about who get them me my would when "
    "make can like time no just him know take people into year your good some could see other than then now "
    "look only come its over think also back after use two how our work first well way even new want because "
    "any these give day most us cat dog fox tree river stone light"
).split()


def word_tokenizer():
    """A real (fast) Hugging Face tokenizer with a small word-level vocabulary, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


def random_text(n_words: int, rng) -> str:
    return " ".join(rng.choice(WORDS, size=n_words))
