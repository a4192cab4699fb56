"""The blocked torch path (the CPU implementation) against the float64 materialising reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_verbose_allclose, attn_inputs, check_attn_stats, masked_lse, random_tokens

from attnscope.kernels import ATTN_VECTOR_STATS, AttnStatsSpec, KeyRanges, ScoreMod, attn_stats, attn_stats_torch
from attnscope.kernels._cpu_fused import HAS_NUMBA
from attnscope.kernels.reference import attention_probs_ref, attn_stats_ref
from attnscope.kernels.stats import LEARNED_SINK

# (batch, heads, kv heads, L, d_head, window, padded, block_q)
SHAPES = [
    (1, 1, 1, 1, 16, None, False, 16),  # a single token
    (1, 2, 2, 33, 80, None, False, 16),  # d_head 80, L not a multiple of the block
    (2, 4, 2, 37, 16, None, True, 16),  # GQA, left+right padding
    (1, 3, 1, 50, 32, 7, False, 16),  # MQA, sliding window shorter than a block
    (2, 4, 1, 45, 64, 20, True, 8),  # window + padding, many blocks
    (1, 2, 1, 70, 24, None, False, 128),  # one block wider than L
]


NUMBA = [pytest.param(True, id="numba=True", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba missing"))]
NUMBA.append(pytest.param(False, id="numba=False"))


@pytest.mark.parametrize("with_lse", [False, True], ids=["own-lse", "forward-lse"])
@pytest.mark.parametrize("use_numba", NUMBA)
@pytest.mark.parametrize("B, H, Hkv, L, D, window, padded, block_q", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["smooth", "peaked"])
def test_torch_path_matches_reference(B, H, Hkv, L, D, window, padded, block_q, scale, use_numba, with_lse):
    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=scale)
    spec = AttnStatsSpec(bins=256, thumb_size=8)
    scaling = D**-0.5
    tokens = random_tokens(B, L)
    lse = masked_lse(q, k, scaling, ranges) if with_lse else None
    out = attn_stats_torch(q, k, scaling, ranges, spec, block_q=block_q, use_numba=use_numba, tokens=tokens, lse=lse)
    ref = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens)
    # loosened for a given lse: the fused pass forms p = exp(s - lse) with the forward's float32 lse, so each p
    # carries |lse - lse(fp32 s)| ~ 1e-7 |s| as a relative error, which sum p^2 over a head (~50) shows at ~1e-6
    check_attn_stats(out, ref, spec, q, k, scaling, ranges, mom_rtol=1e-5 if with_lse else 1e-6)


# (batch, heads, kv heads, L, d_head, window, chunk, padded, block_q): the key ranges other architectures define
LAYER_KINDS = [
    (2, 4, 2, 45, 24, 6, None, True, 16),  # sliding window (Gemma-2, gpt-oss, Cohere-2 local layers), padding
    (2, 3, 1, 53, 16, None, 8, True, 16),  # chunks shorter than a block (Llama-4), padding: chunks count from start
    (1, 2, 2, 70, 32, None, 24, False, 16),  # chunks longer than a block, L not a multiple of either
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["own-lse", "forward-lse"])
@pytest.mark.parametrize("use_numba", NUMBA)
@pytest.mark.parametrize("softcap, sinks", [(None, False), (2.5, False), (None, True), (2.5, True)],
                         ids=["plain", "softcap", "sinks", "softcap+sinks"])  # fmt: skip
@pytest.mark.parametrize("B, H, Hkv, L, D, window, chunk, padded, block_q", LAYER_KINDS)
def test_model_defined_attention_matches_reference(
    B, H, Hkv, L, D, window, chunk, padded, block_q, softcap, sinks, use_numba, with_lse
):
    # peaked scores (scale 3), so the softcap bends them and the sinks take a share from 0 to ~1
    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=3.0)
    ranges = ranges.with_window(window, chunk)
    # near the rows' largest logits (capped at +-softcap)
    sink_logits = torch.randn(H) * 2 + (2.0 if softcap else 6.0) if sinks else None
    spec = AttnStatsSpec(bins=256, thumb_size=8)
    scaling = 0.3  # not 1/sqrt(d): the module's own scaling
    tokens = random_tokens(B, L)
    lse = masked_lse(q, k, scaling, ranges, softcap, sink_logits) if with_lse else None
    mod = ScoreMod(softcap, sink_logits)
    out = attn_stats_torch(
        q, k, scaling, ranges, spec, block_q=block_q, use_numba=use_numba, tokens=tokens, lse=lse, mod=mod
    )
    ref = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens, softcap=softcap, sinks=sink_logits)
    check_attn_stats(
        out, ref, spec, q, k, scaling, ranges, mom_rtol=1e-5 if with_lse else 1e-6, softcap=softcap, sinks=sink_logits
    )
    share = ref[LEARNED_SINK.name]
    if sinks:  # the rows' weights and their sink's share make one
        p = attention_probs_ref(q, k, scaling, ranges, softcap=softcap, sinks=sink_logits)
        real = ranges.allowed(L).any(-1).expand(B, H, L)
        torch.testing.assert_close(p.sum(-1)[real] + share[real], torch.ones_like(share[real]))
        assert share[real].max() > 0.2 and share[real].min() < 0.8  # the sinks matter, not always alone
    else:
        assert not share.any()


@pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")
@pytest.mark.parametrize("with_lse", [False, True], ids=["own-lse", "forward-lse"])
@pytest.mark.parametrize("softcap", [None, 2.5], ids=["plain", "softcap"])
@pytest.mark.parametrize("B, H, Hkv, L, D, window, padded, block_q", [SHAPES[2], SHAPES[4], SHAPES[5]])
def test_separate_products_match_reference(monkeypatch, B, H, Hkv, L, D, window, padded, block_q, softcap, with_lse):
    """Long rows take one score product per (batch row, key head), copied into the block's buffer (the Numba
    pass reads it as [B Hkv, G R_blk, Lk]); forced here for rows of every length."""
    from attnscope.kernels import torch_path

    monkeypatch.setattr(torch_path, "_SEPARATE_PRODUCTS_KEYS", 1)
    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=3.0)
    spec = AttnStatsSpec(bins=256, thumb_size=8)
    scaling, tokens = D**-0.5, random_tokens(B, L)
    lse = masked_lse(q, k, scaling, ranges, softcap) if with_lse else None
    out = attn_stats_torch(
        q, k, scaling, ranges, spec, block_q=block_q, tokens=tokens, lse=lse, mod=ScoreMod(softcap, None)
    )
    ref = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens, softcap=softcap)
    check_attn_stats(out, ref, spec, q, k, scaling, ranges, mom_rtol=1e-5 if with_lse else 1e-6, softcap=softcap)


def test_reference_windows_and_chunks_are_the_definitions():
    # the dense reference mask against the contract's definitions, written independently
    r = KeyRanges(torch.tensor([0, 2]), torch.tensor([11, 9]), chunk=4)
    ok = r.allowed(11)[:, 0]
    for b, (st, en) in enumerate([(0, 11), (2, 9)]):
        for i in range(11):
            for j in range(11):
                want = st <= j <= i < en and (i - st) // 4 == (j - st) // 4
                assert bool(ok[b, i, j]) == want, (b, i, j)
    rows = torch.arange(11)
    assert r.lo(rows)[1].tolist() == [2, 2, 2, 2, 2, 2, 6, 6, 6, 6, 10]
    w = KeyRanges.full(1, 9, window=3)
    assert w.lo(torch.arange(9))[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="not both"):
        KeyRanges.full(1, 9, window=3).with_window(3, 4)


@pytest.mark.parametrize("vocab", [2, 200], ids=["every-token-frequent", "every-token-rare"])
@pytest.mark.parametrize("use_numba", NUMBA)
def test_head_role_masses_for_frequent_and_rare_tokens(vocab, use_numba):
    # the fused pass compares every key for a token with many earlier copies and follows the links to the copies
    # of a rare one: both against the reference, with a window and padding (keys before the window or the prompt)
    q, k, ranges = attn_inputs(2, 3, 1, 150, 16, 40, True)
    tokens = torch.randint(0, vocab, (2, 150))
    tokens[:, 100:103] = 7  # a token repeated on the diagonal: key j = i is never an earlier copy
    spec = AttnStatsSpec(bins=64, thumb_size=8)
    out = attn_stats_torch(q, k, 0.25, ranges, spec, block_q=32, use_numba=use_numba, tokens=tokens)
    ref = attn_stats_ref(q, k, 0.25, ranges, spec, tokens=tokens)
    for name in ("dup", "induction"):
        assert_verbose_allclose(out[name], ref[name], atol=1e-5, rtol=1e-5, name=name)
    assert ref["dup"].amax() > 0 and ref["induction"].amax() > 0  # some repeats inside the window


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    # the statistics upcast to fp32 inside; against the fp64 reference on the same rounded inputs
    q, k, ranges = attn_inputs(2, 4, 2, 41, 64, None, True, dtype=dtype)
    spec = AttnStatsSpec(bins=128, thumb_size=16)
    tokens = random_tokens(2, 41)
    out = attn_stats(q, k, 0.125, ranges, spec, tokens=tokens)
    ref = attn_stats_ref(q, k, 0.125, ranges, spec, tokens=tokens)
    # fp16/bf16: FlashAttention's rule against the reference in the low precision. That reference computes in
    # float32 from the rounded inputs (upcast=False): it has no fp16/bf16 mode, and the torch path, like the
    # kernels, upcasts q and k before any arithmetic, so float32 is the precision both work in; one computing in
    # fp16 would allow ~1e-3 and hardly fail. atol: 1e-6 of each statistic's size (check_attn_stats)
    low = attn_stats_ref(q, k, 0.125, ranges, spec, tokens=tokens, upcast=False) if dtype != torch.float32 else None
    check_attn_stats(out, ref, spec, q, k, 0.125, ranges, ref_low=low)


def test_invariants():
    q, k, ranges = attn_inputs(2, 3, 3, 60, 16, None, True, scale=2.0)
    out = attn_stats(q, k, 0.25, ranges, AttnStatsSpec(bins=64, thumb_size=64))
    rows = (ranges.end - ranges.start).sum().item()
    # every real query's row sums to one, so attention received sums to the number of rows
    assert out["recv_sum"].sum(-1).sum(0).double() == pytest.approx([rows] * 3, rel=1e-5)
    assert out["moments"][:, 1] == pytest.approx([rows] * 3, rel=1e-6)
    assert out["dist"].sum(-1).sum(0) == pytest.approx([rows] * 3, rel=1e-5)
    assert out["dist"].sum(-1)[:, 0].tolist() == pytest.approx((ranges.end - ranges.start).tolist(), rel=1e-5)
    n_keys = (torch.arange(60) - ranges.start[:, None] + 1).clamp(min=1)  # [B, L] allowed keys per query
    assert (out["entropy"] >= -1e-6).all()
    assert (out["entropy"] <= torch.log(n_keys.float())[:, None] + 1e-5).all()
    assert (out["rowmax"] <= 1 + 1e-6).all() and (out["diag"] <= out["rowmax"] + 1e-6).all()
    # padding queries: exactly zero, never NaN
    for b in range(2):
        lo, hi = ranges.start[b].item(), ranges.end[b].item()
        for v in ("diag", "entropy", "rowmax", "sink", "prev"):
            assert not out[v].isnan().any()
            assert (out[v][b, :, :lo] == 0).all() and (out[v][b, :, hi:] == 0).all()
    # thumbnail with R >= L: [B, H, L, L], one cell per (query, key), i.e. p itself
    assert out["thumb"].shape == (2, 3, 60, 60)
    p = attention_probs_ref(q, k, 0.25, ranges)
    for b in range(2):
        lo, hi = ranges.start[b].item(), ranges.end[b].item()
        n = hi - lo
        assert_verbose_allclose(out["thumb"][b, :, :n, :n], p[b, :, lo:hi, lo:hi], name="thumb")
        assert (out["thumb"][b, :, n:] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_head_role_masses_by_hand(impl):
    # q = 0: every query attends uniformly to its i - start + 1 keys, so each mass is a count over that number
    tokens = torch.tensor([[7, 7, 5, 8, 9, 5, 8, 5], [0, 3, 4, 3, 4, 3, 3, 9]])
    ranges = KeyRanges(torch.tensor([0, 1]), torch.tensor([8, 7]))  # row 1: left and right padding
    q, k = torch.zeros(2, 1, 8, 16), torch.randn(2, 1, 8, 16)
    fn = attn_stats_ref if impl == "reference" else attn_stats_torch
    out = fn(q, k, 0.25, ranges, AttnStatsSpec(bins=32, thumb_size=4), tokens=tokens)
    # row 0 (start 0): dup counts earlier equal tokens, induction earlier keys whose predecessor equals tok_i
    dup0 = [0, 1 / 2, 0, 0, 0, 1 / 6, 1 / 7, 2 / 8]
    ind0 = [0, 0, 0, 0, 0, 1 / 6, 1 / 7, 2 / 8]  # 5@5: key 3 follows a 5; 8@6: key 4 follows 8; 5@7: keys 3, 6
    # row 1 (start 1, end 7): key 0 and query 7 are padding; the token before key 1 is not a real token
    dup1 = [0, 0, 0, 1 / 3, 1 / 4, 2 / 5, 3 / 6, 0]
    ind1 = [0, 0, 0, 1 / 3, 1 / 4, 2 / 5, 2 / 6, 0]  # 3@3: key 2 follows 3 (key 1 has no real predecessor)
    assert_verbose_allclose(out["dup"][:, 0], torch.tensor([dup0, dup1]), name="dup")
    assert_verbose_allclose(out["induction"][:, 0], torch.tensor([ind0, ind1]), name="induction")


def test_fully_masked_batch_row():
    # a row with no real token at all (an empty prompt slot) gives zeros, not NaN
    q, k, _ = attn_inputs(2, 2, 2, 12, 16, None, False)
    ranges = KeyRanges(torch.tensor([0, 0]), torch.tensor([12, 0]))
    out = attn_stats(q, k, 0.25, ranges, AttnStatsSpec(bins=32, thumb_size=4))
    for v in ATTN_VECTOR_STATS:
        assert not out[v].isnan().any(), v
        assert (out[v][1] == 0).all(), v
    assert out["moments"][:, 1] == pytest.approx([12, 12])


def test_bin_edges_of_the_contract():
    from attnscope.kernels import linear_bin, log_bin

    assert linear_bin(torch.tensor([0.0, 0.2499, 0.25, 0.99, 1.0]), 4).tolist() == [0, 0, 1, 3, 3]
    lb = log_bin(torch.log10(torch.tensor([0.0, 1e-13, 1e-12, 1e-6, 0.5, 1.0], dtype=torch.float64)), 12, -12.0)
    assert lb.tolist() == [0, 0, 0, 6, 11, 11]


@pytest.mark.parametrize("bins, log_min", [(4096, -12.0), (10, -10.0), (64, -3.0), (7, -1.5)])
def test_union_cells_give_both_bins(bins, log_min):
    """The CPU pass counts one cell a + b per pair (linear bin a, log10 bin b) and sums both histograms from the
    cells: every (a, b) that a p in [0, 1] can have must be the cell's own. (10, -10): the edges at p = 0.1 tie."""
    from attnscope.kernels import linear_bin, log_bin
    from attnscope.kernels._cpu_fused import union_cells

    lin, log = union_cells(bins, log_min)
    assert len(lin) == 2 * bins - 1 and (lin + log == torch.arange(2 * bins - 1).numpy()).all()
    assert (lin[1:] >= lin[:-1]).all() and (log[1:] >= log[:-1]).all()
    g = torch.Generator().manual_seed(bins)
    p = torch.cat([
        10.0 ** (torch.rand(50_000, generator=g, dtype=torch.float64) * (2 - log_min) - 2 + log_min),
        torch.rand(50_000, generator=g, dtype=torch.float64),
        torch.arange(bins + 1, dtype=torch.float64) / bins,  # every linear edge, and 0 and 1
        10.0 ** (log_min - log_min * (torch.arange(bins, dtype=torch.float64) + 0.5) / bins),  # each log10 bin
    ])  # fmt: skip
    a = linear_bin(p, bins)
    b = log_bin(torch.log10(p), bins, log_min)
    cell = (a + b).numpy()
    assert (lin[cell] == a.numpy()).all() and (log[cell] == b.numpy()).all()
    assert set(lin[cell]) == set(range(bins)) and set(log[cell]) == set(range(bins))


def test_bad_inputs():
    q, k, ranges = attn_inputs(1, 3, 2, 8, 16, None, False)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        attn_stats(q, k, 0.25, ranges)
    with pytest.raises(ValueError, match="bins must be a power of two"):
        AttnStatsSpec(bins=100)
    with pytest.raises(ValueError, match="impl"):
        attn_stats(q, k[:, :1], 0.25, ranges, impl="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        KeyRanges.from_attention_mask(torch.tensor([[1, 0, 1, 1]]))
