"""The CPU score and vocabulary matmuls through oneDNN: the same product as torch's, and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from attnscope.kernels import _cpu_gemm


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 129, 65), (384, 1000, 65), (33, 4097, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_the_product(m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    got = _cpu_gemm.linear(x, w, b)
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (m, n) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, atol=1e-4 * k**0.5, rtol=1e-5)
    # strided inputs (a slice of rows, a transposed copy's view) give the same
    xs, ws = torch.randn(2 * m, k, generator=g)[::2], torch.randn(k, n, generator=g).T
    torch.testing.assert_close(_cpu_gemm.linear(xs, ws), torch.nn.functional.linear(xs, ws), atol=1e-4, rtol=1e-5)


def test_onednn_is_used_where_torch_has_it():
    """On a torch with oneDNN (the PyPI x86 wheels) the fast path is live, not silently the fallback."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert _cpu_gemm._onednn_works()
    calls = []
    orig = torch.nn.functional.linear
    torch.nn.functional.linear = lambda *a: calls.append(a) or orig(*a)
    try:
        _cpu_gemm.linear(torch.randn(5, 3), torch.randn(4, 3))
        assert not calls
        _cpu_gemm.linear(torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
        assert len(calls) == 1  # float64: torch's own
        prec = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")  # the user allowed reduced precision: not ours to take
        try:
            _cpu_gemm.linear(torch.randn(5, 3), torch.randn(4, 3))
        finally:
            torch.set_float32_matmul_precision(prec)
        assert len(calls) == 2
    finally:
        torch.nn.functional.linear = orig
