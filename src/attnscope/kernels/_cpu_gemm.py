"""``x @ w.T`` on the CPU through oneDNN, the library torch ships for its own CPU convolutions and fused linears.

The score matmul of a query block is [G R_blk, D + 1] x [D + 1, L_k]: a tiny inner dimension and a long output.
torch's float32 ``matmul`` sends it to its BLAS, which reaches about half of what the same cores give a square
matmul on that shape; oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op torch's own compiler emits for
CPU linears) ran it 2.2x as fast on a 2-core AMD EPYC with AVX-512 (the score matmuls of a SmolLM2 layer at 8,192
tokens: 371 -> 165 ms), in float32 throughout (results within float32 rounding of ``matmul``'s).
The LM head's vocabulary chunks ([T, d_model] x [d_model, V_c]) gain the same way.

It is used only where it is there and gives what ``torch.nn.functional.linear`` gives (checked once per process on
a small awkward shape), and only for float32 CPU tensors while torch computes float32 matmuls in full precision
(``torch.get_float32_matmul_precision() == "highest"`` and oneDNN's own float32 precision left alone); anything else
takes ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import torch

__all__ = ["linear"]

_ok: bool | None = None  # whether oneDNN's linear is there and right (found on first use)


def _onednn_works() -> bool:
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((37, 65), (53, 65), (53,)))
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return y.shape == (37, 53) and bool(torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-4))
    except Exception:  # noqa: BLE001 - any failure of an internal op means: do not use it
        return False


def _full_precision() -> bool:
    fp32 = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return torch.get_float32_matmul_precision() == "highest" and fp32 in ("none", "ieee")


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for x [M, K] and w [N, K]: a new contiguous [M, N] tensor."""
    global _ok
    if x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and x.ndim == w.ndim == 2:
        if _ok is None:
            _ok = _onednn_works()
        if _ok and _full_precision() and (bias is None or bias.dtype == torch.float32):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), bias, "none", [], "")
    return torch.nn.functional.linear(x, w, bias)
