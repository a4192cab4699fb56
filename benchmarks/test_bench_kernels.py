"""pytest-benchmark suite: attention statistics per layer against plain SDPA on the same q, k, v.

    pytest benchmarks/test_bench_kernels.py -o addopts="" [--device cuda]

Sizes come from real model geometries (SmolLM2-135M, Pythia-2.8B); compare each provider with the ``sdpa``
row of the same group (the ratio is the number to read, not the absolute time). GPU rows synchronise before
the host timer stops.
"""

from __future__ import annotations

import pytest
import torch

from attnscope.kernels import AttnStatsSpec, KeyRanges, attn_stats, down_proj_stats

GEOMETRIES = {  # name: (heads, kv heads, head_dim, d_ff, d_model)
    "smollm2-135m": (9, 3, 64, 1536, 576),
    "pythia-2.8b": (32, 32, 80, 10240, 2560),
}


def _device(request) -> str:
    dev = request.config.getoption("--device", default="cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("--device cuda, but torch sees no CUDA device", pytrace=False)
    return dev


def _sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("L", [512, 2048])
@pytest.mark.parametrize("provider", ["sdpa", "torch", "triton"])
def test_attention_layer(benchmark, request, geometry, L, provider):
    dev = _device(request)
    if provider == "triton" and not dev.startswith("cuda"):
        pytest.skip("the Triton provider is timed on CUDA only")
    if geometry == "pythia-2.8b" and L > 512 and not dev.startswith("cuda"):
        pytest.skip("too slow for a CPU benchmark run")
    H, Hkv, D, _, _ = GEOMETRIES[geometry]
    dt = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    q = torch.randn(1, H, L, D, device=dev, dtype=dt)
    k = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
    v = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
    ranges = KeyRanges.full(1, L)
    spec = AttnStatsSpec()
    benchmark.group = f"attention {geometry} L={L}"

    def run():
        if provider == "sdpa":
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
        else:
            attn_stats(q, k, D**-0.5, ranges, spec, impl=provider)
        _sync(dev)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("provider", ["copy", "torch", "triton"])
def test_down_proj(benchmark, request, geometry, provider):
    dev = _device(request)
    if provider == "triton" and not dev.startswith("cuda"):
        pytest.skip("the Triton provider is timed on CUDA only")
    _, _, _, F, O = GEOMETRIES[geometry]
    T = 2048
    x = torch.randn(T, F, device=dev)
    y = torch.randn(T, O, device=dev)
    benchmark.group = f"down_proj {geometry} T={T}"

    def run():
        if provider == "copy":  # the floor: one read and one write of x
            x.clone()
        else:
            down_proj_stats(x, y, 8, impl=provider)
        _sync(dev)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
