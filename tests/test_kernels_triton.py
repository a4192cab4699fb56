"""Triton kernels against the torch path and the float64 reference.

They run under ``TRITON_INTERPRET=1`` on the CPU (tiny shapes, in CI) and compiled on CUDA with
``pytest --device cuda``; without either they skip.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_fa, assert_verbose_allclose, attn_inputs, check_attn_stats, masked_lse, random_tokens

from attnscope.kernels import AttnStatsSpec, attn_stats, attn_stats_torch
from attnscope.kernels.reference import attention_probs_ref, attn_stats_ref, down_proj_stats_ref

triton = pytest.importorskip("triton")
from attnscope.kernels._settings import is_interpreter  # noqa: E402

pytestmark = pytest.mark.interpreter


@pytest.fixture
def kdev(device):
    if is_interpreter():
        return "cpu"
    if not device.startswith("cuda"):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    return device


# (batch, heads, kv heads, L, d_head, window, padded, block_m, block_n)
SHAPES = [
    (1, 1, 1, 1, 16, None, False, 16, 16),  # one token
    (1, 2, 1, 37, 80, None, False, 16, 16),  # d_head 80 padded to 128, L not a multiple of the tile
    (2, 4, 2, 45, 64, None, True, 16, 32),  # GQA, left and right padding
    (1, 3, 1, 50, 32, 7, False, 32, 16),  # MQA, sliding window
    (2, 2, 2, 40, 128, 19, True, 16, 16),  # window + padding, d_head 128
    (1, 2, 1, 150, 64, 100, True, 64, 64),  # the default 64 x 64 tiles over several query and key tiles
    (2, 2, 1, 130, 32, None, True, 16, 16),  # off-band tiles (no mask) between padding and the diagonal band
    (1, 2, 1, 180, 64, 90, False, 32, 16),  # off-band tiles between a window edge and the diagonal band
]


@pytest.mark.parametrize("B, H, Hkv, L, D, window, padded, bm, bn", SHAPES)
def test_qk_stats_matches_reference(kdev, B, H, Hkv, L, D, window, padded, bm, bn):
    from attnscope.kernels.qk_stats import qk_stats

    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=2.0)
    spec = AttnStatsSpec(bins=64, thumb_size=8)
    scaling = D**-0.5
    tokens = random_tokens(B, L)
    out = qk_stats(
        q.to(kdev), k.to(kdev), scaling, ranges, spec, block_m=bm, block_n=bn, poison=True, tokens=tokens.to(kdev)
    )
    out = {n: v.cpu() for n, v in out.items()}
    ref = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens)
    check_attn_stats(out, ref, spec, q, k, scaling, ranges, name="triton ")
    # and against the CPU path, the implementation it replaces on CUDA
    cpu = attn_stats_torch(q, k, scaling, ranges, spec, tokens=tokens)
    for name in ("diag", "entropy", "recv_sum", "thumb", "dist", "induction"):
        assert_verbose_allclose(out[name], cpu[name], atol=1e-5, rtol=1e-5, name=f"triton vs torch {name}")


# (batch, heads, kv heads, L, d_head, window, chunk, padded, block_m, block_n, softcap, sinks, forward lse): the
# attention other architectures define, through masked and off-band tiles
MODEL_DEFINED = [
    (2, 2, 1, 70, 24, 9, None, True, 16, 16, 3.0, False, False),  # softcap + sliding window (Gemma-2), d_head 24
    (1, 2, 2, 130, 64, 60, None, False, 16, 16, None, True, False),  # sinks + window (gpt-oss), off-band tiles
    (2, 3, 1, 75, 32, None, 8, True, 16, 16, None, False, False),  # chunks shorter than a tile (Llama-4), padding
    (1, 2, 1, 150, 16, None, 48, False, 16, 16, 2.0, True, False),  # chunks over several tiles, softcap + sinks
    (1, 2, 1, 60, 16, None, 40, True, 16, 16, 2.0, True, True),  # the same with the forward's lse
    (2, 2, 2, 50, 48, 12, None, True, 16, 32, None, True, True),  # sinks with the forward's lse, d_head 48
]


@pytest.mark.parametrize("B, H, Hkv, L, D, window, chunk, padded, bm, bn, softcap, sinks, with_lse", MODEL_DEFINED)
def test_qk_stats_model_defined_attention(
    kdev, B, H, Hkv, L, D, window, chunk, padded, bm, bn, softcap, sinks, with_lse
):
    from attnscope.kernels.contract import ScoreMod
    from attnscope.kernels.qk_stats import qk_stats

    q, k, ranges = attn_inputs(B, H, Hkv, L, D, None, padded, scale=3.0)
    ranges = ranges.with_window(window, chunk)
    sink_logits = torch.randn(H) * 2 + (2.0 if softcap else 6.0) if sinks else None
    spec = AttnStatsSpec(bins=64, thumb_size=8)
    scaling = 0.3
    tokens = random_tokens(B, L)
    lse = masked_lse(q, k, scaling, ranges, softcap, sink_logits).to(kdev) if with_lse else None
    mod = ScoreMod(softcap, sink_logits.to(kdev) if sinks else None)
    out = qk_stats(
        q.to(kdev), k.to(kdev), scaling, ranges, spec, bm, bn, poison=True, tokens=tokens.to(kdev), lse=lse, mod=mod
    )
    out = {n: v.cpu() for n, v in out.items()}
    ref = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens, softcap=softcap, sinks=sink_logits)
    check_attn_stats(out, ref, spec, q, k, scaling, ranges, name="triton ", softcap=softcap, sinks=sink_logits,
                     mom_rtol=1e-5 if with_lse else 1e-6)  # fmt: skip
    assert bool(ref["learned_sink"].amax() > 0.2) == sinks  # the sinks take a visible share, or none


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qk_stats_low_precision(kdev, dtype):
    from attnscope.kernels.qk_stats import qk_stats

    q, k, ranges = attn_inputs(1, 2, 1, 33, 64, None, False, dtype=dtype)
    spec = AttnStatsSpec(bins=64, thumb_size=8)
    tokens = random_tokens(1, 33)
    out = qk_stats(q.to(kdev), k.to(kdev), 0.125, ranges, spec, 16, 16, poison=True, tokens=tokens.to(kdev))
    out = {n: v.cpu() for n, v in out.items()}
    # FlashAttention's rule against the reference in float32 from the same rounded inputs (upcast=False): the
    # reference has no fp16/bf16 mode, and the kernel upcasts its loads (bf16/fp16 products are exact in its fp32
    # accumulation), so float32 is its working precision; atol 1e-6 of each statistic's size (check_attn_stats)
    ref = attn_stats_ref(q, k, 0.125, ranges, spec, tokens=tokens)
    low = attn_stats_ref(q, k, 0.125, ranges, spec, tokens=tokens, upcast=False)
    check_attn_stats(out, ref, spec, q, k, 0.125, ranges, name=f"{dtype} ", ref_low=low)


def test_dispatch_forces_triton(kdev):
    q, k, ranges = attn_inputs(1, 2, 2, 20, 16, None, False)
    spec = AttnStatsSpec(bins=32, thumb_size=4)
    a = attn_stats(q.to(kdev), k.to(kdev), 0.25, ranges, spec, impl="triton")
    b = attn_stats(q, k, 0.25, ranges, spec, impl="torch")
    assert_verbose_allclose(a["entropy"].cpu(), b["entropy"], name="entropy")


@pytest.mark.parametrize("T, F, O, k", [(1, 20, 7, 8), (37, 300, 70, 8), (16, 512, 64, 4)])
def test_down_proj_matches_reference(kdev, T, F, O, k):
    from attnscope.kernels.down_proj import down_proj_stats_triton

    x, y = torch.randn(T, F), torch.randn(T, O)
    out = {n: v.cpu() for n, v in down_proj_stats_triton(x.to(kdev), y.to(kdev), k).items()}
    ref = down_proj_stats_ref(x, y, k)
    for name in ("in_norm", "out_norm", "topk_val", "neuron_max", "neuron_sum", "neuron_sumsq"):
        assert_verbose_allclose(out[name], ref[name], atol=1e-5, rtol=1e-5, name=name)
    assert torch.equal(out["topk_idx"], ref["topk_idx"])
    assert torch.equal(out["neuron_argmax"], ref["neuron_argmax"])


def test_kernel_limits_are_clear():
    from attnscope.kernels._settings import down_proj_settings, qk_stats_settings

    with pytest.raises(RuntimeError, match="head_dim <= 256"):
        qk_stats_settings(512, 100, 64, 8)
    with pytest.raises(RuntimeError, match="top_k <= 64"):
        down_proj_settings(1024, 64, 100)


def test_profile_with_triton_equals_torch_path(kdev, rng):
    # the profiler's two implementations stay in sync end to end (tiny GPT-NeoX: d_head 80, partial rotary)
    import numpy as np
    from helpers import random_text, tiny_model, word_tokenizer

    from attnscope.profiler import profile

    model, tok = tiny_model("gpt_neox", vocab=200).to(kdev), word_tokenizer()
    prompts = [random_text(int(n), rng) for n in (17, 9)]
    kw = dict(spec=AttnStatsSpec(bins=128, thumb_size=8), progress=False, batch_size=2, top_k=4)
    a = profile(model, tok, prompts, impl="triton", **kw)
    b = profile(model, tok, prompts, impl="torch", **kw)
    for name, x in a.arrays.items():
        y = b.arrays[name]
        if name.startswith("attn.hist"):
            assert np.abs(x - y).sum() <= 2e-3 * x.sum() + 4, name  # edge values may move one bin
        elif x.dtype.kind in "iu":
            assert np.array_equal(x, y), name
        else:
            assert_verbose_allclose(x, y, atol=1e-5, rtol=1e-4, name=name)


def _near_edge_per_bin(values: torch.Tensor, coord, bins: int, tol: float) -> torch.Tensor:
    """[bins] how many values lie within ``tol`` bin units of an edge of each bin (a value counts for both sides)."""
    x = coord(values.double())
    x = torch.nan_to_num(x, neginf=-1.0)
    near = torch.zeros(bins, dtype=torch.long)
    frac = x - x.floor()
    edge = (x > 0) & (x < bins) & ((frac < tol) | (frac > 1 - tol))
    e = x[edge].round().long()  # the edge: bins e - 1 and e may trade the value
    for side in (e - 1, e):
        ok = (side >= 0) & (side < bins)
        near += torch.bincount(side[ok], minlength=bins)
    return near


# (batch, heads, kv heads, L, d_head, window, padded, block_m, block_n): tiles >= 64 x 64 holding the diagonal,
# padding and a window edge, where a mask paired with the wrong elements would move counts between bins
HIST_SHAPES = [
    (2, 2, 1, 200, 64, 70, True, 64, 64),
    (1, 2, 2, 400, 80, None, False, 128, 64),  # with off-band tiles
]


@pytest.mark.parametrize("B, H, Hkv, L, D, window, padded, bm, bn", HIST_SHAPES)
def test_qk_stats_histograms_bin_by_bin(kdev, B, H, Hkv, L, D, window, padded, bm, bn):
    from attnscope.kernels.qk_stats import qk_stats

    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=2.0)
    spec = AttnStatsSpec()  # the default 4096 bins: most bins hold a few values, so a moved count shows
    scaling = D**-0.5
    out = qk_stats(q.to(kdev), k.to(kdev), scaling, ranges, spec, block_m=bm, block_n=bn)
    ref = attn_stats_ref(q, k, scaling, ranges, spec)
    p = attention_probs_ref(q, k, scaling, ranges)  # [B, H, L, L] float64
    allowed = ranges.allowed(L).expand_as(p)
    nb = spec.bins
    coords = {
        "hist_all": lambda x: x * nb,
        "hist_log": lambda x: (torch.log10(x) - spec.log_min) * nb / -spec.log_min,
    }
    for name, coord in coords.items():
        a, e = out[name].cpu().long(), ref[name].long()  # [H, NB]
        assert torch.equal(a.sum(-1), e.sum(-1)), f"{name}: totals {a.sum(-1).tolist()} vs {e.sum(-1).tolist()}"
        assert (e > 0).sum() > nb // 8, f"{name}: too few bins populated for a bin-by-bin test"
        for h in range(H):
            # fp32 p differs from fp64 p by ~1e-6 relative (1e-2 bins at p ~ 1): only values this close to an edge move
            slack = _near_edge_per_bin(p[:, h][allowed[:, h]], coord, nb, 1e-2)
            bad = torch.nonzero((a[h] - e[h]).abs() > slack).flatten()
            assert bad.numel() == 0, (
                f"{name} head {h}: {bad.numel()} bins differ, first {bad[:5].tolist()}: "
                f"kernel {a[h][bad[:5]].tolist()} vs reference {e[h][bad[:5]].tolist()}"
            )


@pytest.mark.parametrize(
    "B, H, Hkv, L, D, window, padded, bm, bn",
    [SHAPES[2], SHAPES[4], SHAPES[6], SHAPES[7]],  # GQA + padding, window + padding, off-band tiles
)
def test_qk_stats_with_lse_from_the_forward(kdev, B, H, Hkv, L, D, window, padded, bm, bn):
    from attnscope.kernels.qk_stats import qk_stats

    q, k, ranges = attn_inputs(B, H, Hkv, L, D, window, padded, scale=2.0)
    spec = AttnStatsSpec(bins=64, thumb_size=8)
    scaling = D**-0.5
    tokens = random_tokens(B, L)
    lse = masked_lse(q, k, scaling, ranges)  # [B, H, L]
    kw = dict(block_m=bm, block_n=bn, poison=True, tokens=tokens.to(kdev))
    out = qk_stats(q.to(kdev), k.to(kdev), scaling, ranges, spec, lse=lse.to(kdev), **kw)
    out = {n: v.cpu() for n, v in out.items()}
    ref = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens)
    check_attn_stats(out, ref, spec, q, k, scaling, ranges, name="triton with lse ")
    # the kernel really uses the lse it is given: a shifted one scales every p by exp(-0.5), which the attention
    # received shows (the row statistics divide by each row's sum, so they stay exact whatever the lse's rounding)
    off = qk_stats(q.to(kdev), k.to(kdev), scaling, ranges, spec, lse=(lse + 0.5).to(kdev), **kw)
    keys = ref["recv_sum"] > 1e-30  # [B, H, L] keys that receive attention
    ratio = off["recv_sum"].cpu()[keys] / ref["recv_sum"].float()[keys]
    assert torch.allclose(ratio, torch.full_like(ratio, torch.exp(torch.tensor(-0.5)).item()), rtol=1e-4)
    assert_verbose_allclose(off["diag"], ref["diag"], atol=1e-5, rtol=1e-5, name="row statistics of p / sum p")


# -- the configurations the profiler launches: the launcher's own tiles (64 x 32, 64 x 16 for fp32, 8 warps), the
# default 4096 bins and 64 x 64 thumbnail, d_head 64 / 80 (padded to 128) / 128, each dtype, with and without the
# forward's lse. Compiled on a GPU (``--device cuda``); under the interpreter at a length of two query tiles.
PROD_L = 70 if is_interpreter() else 300
# (batch, heads, kv heads, d_head, window, padded)
PROD_SHAPES = {
    64: (2, 4, 2, 64, None, True),  # GQA, padding
    80: (2, 4, 4, 80, None, True),  # Pythia: d_head 80, MHA, padding
    128: (1, 4, 1, 128, 45, False),  # MQA, a sliding window
}
PROD_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("with_lse", [False, True], ids=["own-lse", "forward-lse"])
@pytest.mark.parametrize("D", list(PROD_SHAPES), ids=[f"d{d}" for d in PROD_SHAPES])
@pytest.mark.parametrize("dtype", PROD_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_qk_stats_production_configuration(kdev, dtype, D, with_lse):
    from attnscope.kernels.qk_stats import qk_stats

    B, H, Hkv, D, window, padded = PROD_SHAPES[D]
    q, k, ranges = attn_inputs(B, H, Hkv, PROD_L, D, window, padded, dtype=dtype, scale=2.0)
    spec = AttnStatsSpec()  # 4096 bins, 64 x 64 thumbnail: what the profiler runs
    scaling = D**-0.5
    tokens = random_tokens(B, PROD_L)
    lse = masked_lse(q, k, scaling, ranges).to(kdev) if with_lse else None
    out = qk_stats(q.to(kdev), k.to(kdev), scaling, ranges, spec, poison=True, tokens=tokens.to(kdev), lse=lse)
    out = {n: v.cpu() for n, v in out.items()}
    # against the float64 reference on the same rounded inputs; bf16/fp16 by FlashAttention's rule against the
    # reference in float32 (upcast=False: it has no bf16/fp16 mode, and fp32 is the kernel's working precision)
    ref = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens)
    low = attn_stats_ref(q, k, scaling, ranges, spec, tokens=tokens, upcast=False) if dtype != torch.float32 else None
    # loosened for a given lse (atol 1e-5 of each statistic's size instead of 1e-6; fp32: moments rtol 1e-5): the
    # kernel forms p with the forward's float32 lse, which the reference never sees, so each p carries its rounding,
    # ~1e-7 |lse| relative
    tol = dict(mom_rtol=1e-5, fa_atol=1e-5) if with_lse else {}
    check_attn_stats(out, ref, spec, q, k, scaling, ranges, name=f"{dtype} d{D} ", ref_low=low, **tol)


@pytest.mark.parametrize("dtype", PROD_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_down_proj_production_configuration(kdev, dtype):
    # Pythia-2.8B's d_ff and d_model at the launcher's own chunks; low precision ties |x| values, so indices are
    # checked through the values they point at
    from attnscope.kernels.down_proj import down_proj_stats_triton

    T, F, O, k = (40, 2560, 640, 8) if is_interpreter() else (300, 10240, 2560, 8)
    x, y = torch.randn(T, F).to(dtype), torch.randn(T, O).to(dtype)
    out = {n: v.cpu() for n, v in down_proj_stats_triton(x.to(kdev), y.to(kdev), k).items()}
    ref = down_proj_stats_ref(x.float(), y.float(), k)
    # bf16/fp16: FlashAttention's rule against the reference in float32 from the same rounded inputs (upcast=False:
    # the kernel upcasts its loads and accumulates in fp32), atol 1e-6 of each statistic's size
    low = down_proj_stats_ref(x, y, k, upcast=False) if dtype != torch.float32 else None
    for name in ("in_norm", "out_norm", "neuron_max", "neuron_sum", "neuron_sumsq"):
        if low is None:
            assert_verbose_allclose(out[name], ref[name], atol=1e-5, rtol=1e-5, name=f"{dtype} {name}")
        else:
            atol = 1e-6 * max(1.0, ref[name].abs().max().item())
            assert_close_fa(out[name], ref[name], low[name], atol=atol, name=f"{dtype} {name}")
    assert_verbose_allclose(out["topk_val"].abs(), ref["topk_val"].abs(), atol=0, rtol=0, name=f"{dtype} |top-k|")
    xf = x.float()
    assert torch.equal(xf.gather(1, out["topk_idx"]).abs(), out["topk_val"].abs()), "top-k indices and values"
    assert torch.equal(xf[out["neuron_argmax"], torch.arange(F)], out["neuron_max"]), "neuron argmax"
