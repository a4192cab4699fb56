"""Span attention (mass and top-1 share between a prompt's named spans) and the argmax vector, in every
implementation, against the float64 reference that materialises p and reads each span's rows and keys directly."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_verbose_allclose, attn_inputs, random_tokens

from attnscope.kernels import AttnStatsSpec, KeyRanges, attn_stats_torch
from attnscope.kernels._cpu_fused import HAS_NUMBA
from attnscope.kernels.contract import pool_layout, span_names, validate_spans
from attnscope.kernels.reference import attention_probs_ref, attn_stats_ref

IMPLS = [pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")), "torch"]


def random_spans(n: int, gen: torch.Generator, names=("needle", "context", "question")) -> dict:
    """Random named spans of a prompt of n tokens: some in several pieces, some overlapping (the needle may lie
    inside the context), some a single token."""
    out = {}
    for name in names:
        pieces = []
        for _ in range(int(torch.randint(1, 3, (), generator=gen))):
            s = int(torch.randint(0, n, (), generator=gen))
            e = min(n, s + 1 + int(torch.randint(0, max(1, n // 3), (), generator=gen)))
            pieces.append((s, e))
        out[name] = pieces
    return validate_spans(out, n)


def batch_spans(ranges: KeyRanges, gen, empty_row: int | None = None) -> list:
    n = (ranges.end - ranges.start).tolist()
    return [None if b == empty_row else random_spans(int(n[b]), gen) for b in range(len(n))]


def check_spans(out, ref):
    assert len(out) == len(ref)
    for b, (a, e) in enumerate(zip(out, ref)):
        if e is None:
            assert a is None
            continue
        assert_verbose_allclose(a[..., 0], e[..., 0], atol=2e-6, rtol=1e-5, name=f"row {b} mass")
        assert_verbose_allclose(a[..., 1], e[..., 1], atol=1e-12, rtol=0, name=f"row {b} top1")


# (batch, heads, kv heads, L, d_head, window, padded, block_q)
SHAPES = [
    (1, 2, 1, 1, 16, None, False, 16),  # one token: every span is the final row
    (2, 3, 1, 41, 24, None, True, 16),  # padding, L not a multiple of the block
    (2, 2, 2, 53, 16, 9, True, 8),  # sliding window + padding, many blocks
    (3, 2, 1, 90, 32, None, True, 128),  # a batch row without spans, thumbnail cells cut further by the spans
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B, H, Hkv, L, D, window, padded, block_q", SHAPES)
def test_span_attention_matches_reference(B, H, Hkv, L, D, window, padded, block_q, impl):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=2.0)
    spans = batch_spans(ranges, gen, empty_row=2 if B > 2 else None)
    spec = AttnStatsSpec(bins=64, thumb_size=8)
    tokens = random_tokens(B, L)
    out = attn_stats_torch(q, k, D**-0.5, ranges, spec, block_q=block_q, use_numba=impl == "numba", tokens=tokens,
                           spans=spans)  # fmt: skip
    ref = attn_stats_ref(q, k, D**-0.5, ranges, spec, tokens=tokens, spans=spans)
    check_spans(out["span"], ref["span"])
    # the spans cut the thumbnail's cells further; the thumbnail is unchanged
    assert_verbose_allclose(out["thumb"], ref["thumb"], atol=1e-5, rtol=1e-5, name="thumb")
    plain = attn_stats_torch(q, k, D**-0.5, ranges, spec, block_q=block_q, use_numba=impl == "numba", tokens=tokens)
    assert "span" not in plain
    assert_verbose_allclose(plain["thumb"], out["thumb"], atol=1e-6, rtol=1e-6, name="thumb with and without spans")


@pytest.mark.interpreter
@pytest.mark.parametrize("B, H, Hkv, L, D, window, padded, bm", [(2, 2, 1, 45, 32, None, True, 16),
                                                                 (1, 2, 2, 70, 16, 20, False, 32)])  # fmt: skip
def test_span_attention_triton(B, H, Hkv, L, D, window, padded, bm, device):
    pytest.importorskip("triton")
    from attnscope.kernels._settings import is_interpreter
    from attnscope.kernels.qk_stats import qk_stats

    if not (is_interpreter() or device.startswith("cuda")):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    dev = "cpu" if is_interpreter() else device
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=2.0)
    spans = batch_spans(ranges, gen)
    spec = AttnStatsSpec(bins=64, thumb_size=8)
    out = qk_stats(q.to(dev), k.to(dev), D**-0.5, ranges, spec, block_m=bm, block_n=16, spans=spans)
    ref = attn_stats_ref(q, k, D**-0.5, ranges, spec, spans=spans)
    check_spans(out["span"], ref["span"])
    assert_verbose_allclose(out["thumb"], ref["thumb"], atol=1e-5, rtol=1e-5, name="thumb")


@pytest.mark.parametrize("impl", IMPLS)
def test_argmax_ties_go_to_the_earlier_key(impl):
    """Equal keys: every row's weights tie, and its argmax is its first allowed key (the start, or the window's)."""
    B, H, L, D = 2, 2, 40, 8
    q = torch.randn(B, H, L, D)
    k = torch.ones(B, 1, L, D)
    ranges = KeyRanges(torch.tensor([0, 3]), torch.tensor([40, 35]), window=6)
    out = attn_stats_torch(q, k, 1.0, ranges, AttnStatsSpec(bins=16, thumb_size=4), block_q=16,
                           use_numba=impl == "numba")  # fmt: skip
    rows = torch.arange(L)
    for b in range(B):
        st, en = int(ranges.start[b]), int(ranges.end[b])
        lo = torch.maximum(rows - 5, torch.tensor(st))
        want = torch.where((rows >= st) & (rows < en), lo - st, 0).float()
        assert torch.equal(out["argmax"][b], want.expand(H, L)), b


def test_span_layout_and_names():
    ranges = KeyRanges(torch.tensor([0, 2]), torch.tensor([20, 12]))
    spans = [validate_spans({"a": [(3, 7)], "b": [(0, 2), (15, 20)]}, 20), validate_spans({"a": [(1, 4)]}, 10)]
    lay = pool_layout(ranges, 20, 4, spans)
    e0 = lay.edges[0].tolist()
    assert {0, 2, 3, 7, 15, 19, 20} <= set(e0) and {5, 10} <= set(e0)  # the spans' cuts and the thumbnail's
    assert lay.edges[1, 0] == 2 and 11 in lay.edges[1].tolist()  # row 1 counts from its start; its final row cut
    assert (lay.cell[1, :2] == -1).all() and (lay.cell[1, 12:] == -1).all()
    assert span_names(spans[0]) == (["a", "b", "last"], ["a", "b"])


def test_bad_spans_are_clear():
    with pytest.raises(ValueError, match="outside"):
        validate_spans({"x": [(5, 30)]}, 20, "row 7")
    with pytest.raises(ValueError, match="row 7.*'last'"):
        validate_spans({"last": [(0, 1)]}, 20, "row 7")
    with pytest.raises(ValueError, match="covers no token"):
        validate_spans({"x": []}, 20)
    assert validate_spans({"x": [(4, 6), (0, 2), (5, 9)]}, 20) == {"x": ((0, 2), (4, 9))}


def test_mass_rows_sum_to_one_over_a_partition():
    """Spans that partition the prompt: each query span's masses over them sum to 1 (no learned sink)."""
    B, H, L, D = 1, 3, 30, 16
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    ranges = KeyRanges.full(B, L)
    spans = [validate_spans({"x": [(0, 11)], "y": [(11, 12)], "z": [(12, 30)]}, L)]
    out = attn_stats_torch(q, k, D**-0.5, ranges, AttnStatsSpec(bins=16, thumb_size=4), spans=spans)
    s = out["span"][0]
    assert_verbose_allclose(s[..., 0].sum(-1), torch.ones(H, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert_verbose_allclose(s[..., 1].sum(-1), torch.ones(H, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    p = attention_probs_ref(q, k, D**-0.5, ranges)
    assert_verbose_allclose(s[:, 3, :, 0], torch.stack([p[0, :, -1, :11].sum(-1), p[0, :, -1, 11], p[0, :, -1, 12:]
                                                       .sum(-1)], -1), atol=1e-6, rtol=0)  # fmt: skip


def test_head_scores_follow_their_definitions():
    """Retrieval and first-token scores of random vectors, against a loop over the definitions."""
    import numpy as np

    from attnscope.kernels.stats import ARGMAX, SINK, VECTORS
    from attnscope.profiler.spans import head_scores

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    Ly, B, H, L = 2, 3, 4, 90
    vec = np.zeros((len(VECTORS), Ly, B, H, L), np.float32)
    lengths = np.array([90, 70, 40])
    ids = rng.integers(0, 5, (B, L))
    for b, n in enumerate(lengths):
        vec[SINK.slot, :, b, :, :n] = rng.random((Ly, H, n))
        vec[ARGMAX.slot, :, b, :, :n] = rng.integers(0, np.arange(1, n + 1), (Ly, H, n))  # argmax <= row
    spans = [{"needle": ((5, 30),), "answer": ((80, 90),)}, {"needle": ((0, 10), (20, 30)), "answer": ((60, 70),)},
             {"needle": ((0, 5),)}]  # fmt: skip
    got = head_scores(vec, ids, lengths, spans)
    for b, n in enumerate(lengths):
        for layer in range(Ly):
            for h in range(H):
                assert got[b, layer, h, 1] == pytest.approx(vec[SINK.slot, layer, b, h, : min(64, n)].mean(), rel=1e-6)
                if "answer" not in spans[b]:
                    assert np.isnan(got[b, layer, h, 0])
                    continue
                needle = {t for s, e in spans[b]["needle"] for t in range(s, e)}
                answer = [t for s, e in spans[b]["answer"] for t in range(s, e)]
                hits = 0
                for t in answer:
                    j = int(vec[ARGMAX.slot, layer, b, h, t - 1])
                    hits += j in needle and ids[b, j] == ids[b, t]
                assert got[b, layer, h, 0] == pytest.approx(hits / len(answer))


@pytest.mark.parametrize("impl", [*IMPLS, pytest.param("triton", marks=pytest.mark.interpreter)])
def test_ashape_and_window_on_rows_longer_than_the_shape(impl, device):
    """Rows longer than A-shape's 128 sink keys + 1024 local keys, padded: the coverage is below 1 and equals the
    reference's; the observation window sums the last 32 rows only."""
    from attnscope.kernels.stats import A_LOCAL, A_SINK_KEYS

    B, H, L, D = 2, 2, 1300, 16
    q, k = torch.randn(B, H, L, D), torch.randn(B, 1, L, D)
    ranges = KeyRanges(torch.tensor([0, 7]), torch.tensor([L, L - 11]))
    spec = AttnStatsSpec(bins=16, thumb_size=4)
    if impl == "triton":
        pytest.importorskip("triton")
        from attnscope.kernels._settings import is_interpreter
        from attnscope.kernels.qk_stats import qk_stats

        if not (is_interpreter() or device.startswith("cuda")):
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        dev = "cpu" if is_interpreter() else device
        out = qk_stats(q.to(dev), k.to(dev), D**-0.5, ranges, spec, block_m=128, block_n=128)
    else:
        out = attn_stats_torch(q, k, D**-0.5, ranges, spec, block_q=256, use_numba=impl == "numba")
    p = attention_probs_ref(q, k, D**-0.5, ranges)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    for b in range(B):
        st, en = int(ranges.start[b]), int(ranges.end[b])
        keep = (j < st + A_SINK_KEYS) | (i - j < A_LOCAL)
        want = (p[b] * keep).sum(-1)[:, st:en]
        assert_verbose_allclose(out["ashape"][b, :, st:en], want, atol=2e-5, rtol=1e-5, name=f"ashape {b}")
        assert float(want[:, -1].max()) < 0.999  # the shape leaves mass out: the test can fail
        win = p[b, :, en - 32 : en].sum(1)
        assert_verbose_allclose(out["window_recv"][b], win, atol=2e-5, rtol=1e-5, name=f"window_recv {b}")
