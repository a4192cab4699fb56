"""Vocabulary reductions (logit lens, next-token entropy): the chunked torch path and the Triton kernel against
the float64 reference that materialises every logit."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_verbose_allclose

from attnscope.kernels.reference import vocab_stats_ref
from attnscope.kernels.vocab_stats_torch import vocab_stats_torch

# (rows, d, vocab, chunk, bias, scale): odd sizes, a vocabulary not a multiple of the chunk, peaked and flat rows
SHAPES = [
    (1, 16, 7, 4, False, 1.0),
    (37, 80, 1000, 256, True, 1.0),
    (20, 64, 517, 512, False, 4.0),
    (5, 24, 300, 1024, True, 0.1),
]


def _inputs(T, D, V, bias, scale, dtype=torch.float32):
    h = (torch.randn(T, D) * scale).to(dtype)
    w = torch.randn(V, D).to(dtype)
    target = torch.randint(0, V, (T,))
    target[torch.rand(T) < 0.2] = -1  # rows with no next token (the last of a prompt)
    b = torch.randn(V).to(dtype) if bias else None
    return h, w, target, b


def _check(out, ref, name="", atol=1e-5, rtol=1e-4, logits=None):
    for key in ("lse", "entropy", "top_prob", "target_prob"):
        assert_verbose_allclose(out[key], ref[key], atol=atol, rtol=rtol, name=f"{name}{key}")
    # the top token and the rank are exact except where two logits tie within float32 rounding (with ``logits``,
    # the float64 logits: the top token's must be the largest within that rounding)
    if logits is None:
        assert torch.equal(out["top_id"].cpu(), ref["top_id"]), f"{name}top_id"
    else:
        got = logits.gather(-1, out["top_id"].cpu()[:, None])[:, 0]
        assert (got >= logits.max(-1).values - 1e-5).all(), f"{name}top_id"
    assert (out["target_rank"].cpu() - ref["target_rank"]).abs().max() <= 1, f"{name}target_rank"


@pytest.mark.parametrize("T, D, V, chunk, bias, scale", SHAPES)
def test_torch_path_matches_reference(T, D, V, chunk, bias, scale):
    h, w, target, b = _inputs(T, D, V, bias, scale)
    out = vocab_stats_torch(h, w, target, b, chunk=chunk)
    ref = vocab_stats_ref(h, w, target, b)
    _check(out, ref)
    assert (out["target_rank"][target < 0] == -1).all() and (out["target_prob"][target < 0] == 0).all()
    assert (out["entropy"] >= -1e-5).all() and (out["entropy"] <= torch.log(torch.tensor(V)) + 1e-5).all()


def _capped_logits(h, w, b, softcap):
    z = h.double() @ w.double().T + b.double()
    return softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("softcap", [1.0, 3.0, 30.0])
def test_torch_path_final_logit_softcapping(softcap):
    # Gemma-2's c tanh(z / c) on the logits (logits ~ +-3 here: tanh saturated to float32 ties would leave the top
    # token undefined); a small cap flattens the distribution
    h, w, target, b = _inputs(29, 40, 611, True, 0.3)
    out = vocab_stats_torch(h, w, target, b, chunk=128, softcap=softcap)
    ref = vocab_stats_ref(h, w, target, b, softcap=softcap)
    _check(out, ref, name=f"cap {softcap} ", logits=_capped_logits(h, w, b, softcap))
    plain = vocab_stats_ref(h, w, target, b)
    if softcap < 10:
        assert not torch.allclose(ref["entropy"], plain["entropy"], atol=1e-2), "the cap must change the distribution"
    assert ref["top_prob"].max() <= 1.0 and (ref["entropy"] > 0).all()


def test_rank_and_top_by_hand():
    # logits [3, 1, 2, 3]: the top is the first 3; two logits lie above the target 2, none above the target 0
    w = torch.tensor([[3.0], [1.0], [2.0], [3.0]])
    h = torch.ones(2, 1)
    out = vocab_stats_torch(h, w, torch.tensor([2, 0]), chunk=3)
    assert out["top_id"].tolist() == [0, 0]
    assert out["target_rank"].tolist() == [2, 0]  # the tie with the other 3 does not count as above
    p = torch.softmax(torch.tensor([3.0, 1, 2, 3]), 0)
    assert_verbose_allclose(out["target_prob"], torch.stack([p[2], p[0]]), name="target_prob")


def test_top_is_the_first_of_tied_maxima_across_chunks():
    """Integer logits (exact in float32): the top is the first of its ties, when a later chunk ties it and when a
    later chunk first beats and then an even later one ties the new maximum; rows in other orders alongside."""
    logit = torch.tensor(
        [
            [5.0, 1, 2, 0, 5, 5, 1, 0, 5, 2],  # the first chunk holds the max, later chunks tie it
            [1.0, 0, 0, 4, 2, 7, 0, 7, 1, 7],  # a later chunk beats the first, later ones tie it
            [0.0, 0, 0, 0, 0, 0, 0, 0, 0, 9],  # the max in the last chunk only
        ]
    )  # [T, V] = h @ w.T with h = the identity rows, w = logit.T
    w = logit.T.contiguous()  # [V, d = 3]
    h = torch.eye(3)
    out = vocab_stats_torch(h, w, torch.full((3,), -1), chunk=3)
    assert out["top_id"].tolist() == [0, 5, 9]


def test_bad_inputs():
    h, w, target, _ = _inputs(4, 8, 10, False, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        vocab_stats_torch(h, w[:, :4], target)
    with pytest.raises(ValueError, match="target"):
        vocab_stats_torch(h, w, target[:2])


triton = pytest.importorskip("triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("T, D, V, chunk, bias, scale", SHAPES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(device, T, D, V, chunk, bias, scale, dtype):
    from attnscope.kernels._settings import is_interpreter
    from attnscope.kernels.vocab_stats import vocab_stats_triton

    if not is_interpreter() and not device.startswith("cuda"):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    dev = "cpu" if is_interpreter() else device
    h, w, target, b = _inputs(T, D, V, bias, scale, dtype)
    out = vocab_stats_triton(h.to(dev), w.to(dev), target.to(dev), None if b is None else b.to(dev), None, 16, 64, 16)
    # against the float64 reference on the same rounded inputs: products of bf16 values are exact in float32
    _check({k: v.cpu() for k, v in out.items()}, vocab_stats_ref(h, w, target, b), name=f"{dtype} ")


@pytest.mark.interpreter
@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_triton_final_logit_softcapping(device, softcap):
    from attnscope.kernels._settings import is_interpreter
    from attnscope.kernels.vocab_stats import vocab_stats_triton

    if not is_interpreter() and not device.startswith("cuda"):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    dev = "cpu" if is_interpreter() else device
    h, w, target, b = _inputs(21, 40, 301, True, 0.3)
    out = vocab_stats_triton(h.to(dev), w.to(dev), target.to(dev), b.to(dev), softcap, 16, 64, 16)
    ref = vocab_stats_ref(h, w, target, b, softcap=softcap)
    _check({k: v.cpu() for k, v in out.items()}, ref, name="cap ", logits=_capped_logits(h, w, b, softcap))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_triton_production_configuration(device, dtype):
    # the launcher's own tiles at a GPT-NeoX-like width and a vocabulary not a multiple of the tile
    from attnscope.kernels._settings import is_interpreter
    from attnscope.kernels.vocab_stats import vocab_stats_triton

    if not is_interpreter() and not device.startswith("cuda"):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    dev = "cpu" if is_interpreter() else device
    T, D, V = (20, 80, 300) if is_interpreter() else (300, 2560, 50304)
    h, w, target, b = _inputs(T, D, V, True, 1.0, dtype)
    out = vocab_stats_triton(h.to(dev), w.to(dev), target.to(dev), b.to(dev))
    _check({k: v.cpu() for k, v in out.items()}, vocab_stats_ref(h, w, target, b), name=f"{dtype} ")
