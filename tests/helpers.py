"""Test helpers: verbose allclose, FlashAttention's low-precision rule, histogram comparison with a bin-edge
allowance, random attention inputs and the check of every attention statistic, tiny HF models.

Test modules import shared helpers from here, never from each other.
"""

from __future__ import annotations

import numpy as np
import torch

from attnscope.kernels import ATTN_VECTOR_STATS, KeyRanges
from attnscope.kernels.reference import attention_probs_ref


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


def assert_close_fa(out, ref64, ref_low, atol: float, name=""):
    """FlashAttention's rule for a low-precision implementation: its error against the float64 reference is at most
    twice the error of the same reference computed in the low precision, plus ``atol``.

    ``max|out - ref64| <= 2 * max|ref_low - ref64| + atol``, from Dao-AILab/flash-attention tests/test_flash_attn.py
    ("Check that FlashAttention's numerical error is at most twice the numerical error of a Pytorch
    implementation": ``output_ref`` upcast, ``output_pt`` = the same ``attention_ref`` with ``upcast=False``). The
    allowance follows the reference's own rounding, so it scales with the inputs instead of a fixed atol/rtol.
    """
    o, e, lo = (torch.as_tensor(x).double().cpu() for x in (out, ref64, ref_low))
    assert o.shape == e.shape == lo.shape, f"{name}: shapes {tuple(o.shape)}, {tuple(e.shape)}, {tuple(lo.shape)}"
    # a NaN would make the comparison below False and pass: every value must be finite
    assert all(torch.isfinite(x).all() for x in (o, e, lo)), f"{name}: NaN or inf"
    if o.numel() == 0:
        return
    diff = (o - e).abs()
    err, err_low = diff.max().item(), (lo - e).abs().max().item()
    if err > 2 * err_low + atol:
        i = tuple(torch.nonzero(diff == err)[0].tolist())
        raise AssertionError(
            f"{name}: max abs error {err:.3g} > 2 x {err_low:.3g} (the reference in low precision) + {atol:.3g}; "
            f"at {list(i)}: {o[i].item()!r} vs {e[i].item()!r}"
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


def attn_inputs(B, H, Hkv, L, D, window, padded, dtype=torch.float32, scale=1.0):
    """Random q [B, H, L, D], k [B, Hkv, L, D] in ``dtype`` and their KeyRanges (left and right padding when
    ``padded`` and B > 1; batch row 0 is never padded)."""
    q = (torch.randn(B, H, L, D) * scale).to(dtype)
    k = (torch.randn(B, Hkv, L, D) * scale).to(dtype)
    if padded and B > 1:
        start = torch.tensor([0] + [int(torch.randint(1, max(2, L // 3), ())) for _ in range(B - 1)])
        end = torch.tensor([L - int(torch.randint(0, max(1, L // 4), ())) for _ in range(B)])
        end[0] = L
        end = torch.maximum(end, start + 1)
        ranges = KeyRanges(start, end, window)
    else:
        ranges = KeyRanges.full(B, L, window)
    return q, k, ranges


def random_tokens(B, L):
    """Random token ids from a vocabulary small enough that tokens repeat often (for the head-role masses)."""
    return torch.randint(0, max(2, L // 4), (B, L))


def masked_lse(q, k, scaling, ranges, softcap=None, sinks=None):
    """[B, H, L] float32 natural log-sum-exp of the allowed scores (as the forward's attention returns it), of the
    capped logits and with the sink's term for a model that has them."""
    B, H, L, _ = q.shape
    kk = k.double().repeat_interleave(H // k.shape[1], dim=1)  # [B, H, L, D]
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * scaling  # [B, H, L, L]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~ranges.allowed(L), float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, H, 1, 1).expand(B, H, L, 1)], dim=-1)
    return torch.logsumexp(s, dim=-1).float()  # -inf on rows without keys: the statistics ignore them


def assert_argmax(argmax, p, ranges, name="argmax", gap=1e-3):
    """The argmax vector [B, H, L] against the float64 probabilities [B, H, L, L]: exact on every real row whose two
    largest weights differ by more than ``gap`` relative (a closer pair may swap in low precision), 0 elsewhere."""
    B, H, L, _ = p.shape
    top = p.double().topk(min(2, L), dim=-1)
    want = top.indices[..., 0] - ranges.start.view(B, 1, 1)
    clear = top.values[..., 0] > 0
    if L > 1:
        clear &= top.values[..., 1] < top.values[..., 0] * (1 - gap)
    rows = torch.arange(L)
    real = ((rows >= ranges.start[:, None]) & (rows < ranges.end[:, None]))[:, None].expand(B, H, L)
    got = argmax.cpu().double()
    bad = real & clear & (got != want)
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} rows differ, first at {bad.nonzero()[0].tolist()}"
    assert bool((got[~real] == 0).all()), f"{name}: padding rows must hold 0"


def check_attn_stats(
    out, ref, spec, q, k, scaling, ranges, name="", mom_rtol=1e-6, ref_low=None, fa_atol=1e-6, softcap=None, sinks=None
):
    """Every attention statistic of ``out`` against the float64 reference ``ref`` (``attn_stats_ref``).

    Float32 inputs: atol = rtol = 1e-5 (moments: rtol ``mom_rtol``). Low-precision inputs pass ``ref_low``, the
    reference on the same rounded inputs computed in float32 (``upcast=False``), and each statistic follows
    ``assert_close_fa`` with atol ``fa_atol`` times the statistic's largest value (at least 1): the sums (received
    attention up to L, distance buckets, moments over every pair of a head) carry an error that grows with their
    size, the probabilities (<= 1) get ``fa_atol`` itself. The moments are checked a column at a time, so the sums
    get the scale of their own size, not that of the pair count. Histograms: the same bin-edge allowance for both.
    """
    p = attention_probs_ref(q, k, scaling, ranges, softcap=softcap, sinks=sinks)
    assert_argmax(out["argmax"], p, ranges, name=f"{name}argmax")
    exact = [v for v in ATTN_VECTOR_STATS if v != "argmax"]
    if ref_low is None:
        for v in exact:
            assert_verbose_allclose(out[v], ref[v], atol=1e-5, rtol=1e-5, name=f"{name}{v}")
        assert_verbose_allclose(out["thumb"], ref["thumb"], atol=1e-5, rtol=1e-5, name=f"{name}thumb")
        assert_verbose_allclose(out["dist"], ref["dist"], atol=1e-5, rtol=1e-5, name=f"{name}dist")
        assert_verbose_allclose(out["moments"], ref["moments"], atol=1e-5, rtol=mom_rtol, name=f"{name}moments")
    else:
        cols = {
            f"{name}moments[{c}]": (out["moments"][:, i], ref["moments"][:, i], ref_low["moments"][:, i])
            for i, c in enumerate(("n", "sum p", "sum p^2"))
        }
        cols.update({f"{name}{v}": (out[v], ref[v], ref_low[v]) for v in (*exact, "thumb", "dist")})
        for n, (a, e, lo) in cols.items():
            assert_close_fa(a, e, lo, atol=fa_atol * max(1.0, e.abs().max().item()), name=n)
    # bin edges: fp32 p differs from fp64 p by ~1e-7; a value within 1e-2 of a bin of an edge may cross it
    vals = p[ranges.allowed(q.shape[2]).expand_as(p)]
    nb = spec.bins
    slack_lin = near_edge_count(vals, nb, lambda x: x * nb, 1e-2)
    slack_log = near_edge_count(vals, nb, lambda x: (torch.log10(x) - spec.log_min) * nb / -spec.log_min, 1e-2)
    assert_hist_close(out["hist_all"], ref["hist_all"], slack_lin, name=f"{name}hist_all")
    assert_hist_close(out["hist_log"], ref["hist_log"], slack_log, name=f"{name}hist_log")


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


def profile_corpus(model_dir, corpus, out, *extra) -> int:
    """``attnscope profile`` of a corpus file into ``out`` with small settings; one prompt per forward (the runs a
    test compares cut the corpus into other batches, and padding changes float32 rounding). Its exit code."""
    from attnscope.cli import main

    argv = ["profile", str(model_dir), "--prompts", str(corpus), "--out", str(out), "--bins", "64"]
    argv += ["--thumb-size", "8", "--top-k", "3", "--shard-size", "3", "--batch-size", "1", "--no-progress", *extra]
    return main(argv)
