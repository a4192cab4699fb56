"""GPU benchmark: Pythia-2.8B's exact geometry (random bf16 weights) at long contexts, in one run.

    python benchmarks/bench_gpu_pythia.py                          # L = 2048, 8192, 32768 on cuda
    python benchmarks/bench_gpu_pythia.py --lengths 256 --layers 2 --device cpu   # a smoke run anywhere

For each L it reports: the plain SDPA forward (time, peak memory), ``attnscope.profile`` (time, peak memory),
HF eager ``output_attentions`` (time and memory, or the out-of-memory it hits: the largest L it managed is kept),
and the attention-statistics kernel alone on one layer's q, k: its achieved QK^T TFLOP/s (two passes over the
causal half: 2 * 2 * H * L^2 * D / 2 flops) against the device's measured bf16 matmul rate. Timings use
``triton.testing.do_bench`` (CUDA events, warm-up, median with p20/p80) where a kernel is timed alone, and
synchronised wall clock for whole-model runs, after one burn-in run that also autotunes and compiles.
Writes ``benchmarks/results/gpu_pythia2.8b_<device>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch


def pythia_config(layers: int | None):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=2560,
        num_hidden_layers=layers or 32,
        num_attention_heads=32,
        intermediate_size=10240,
        rotary_pct=0.25,
        max_position_embeddings=32768,
        use_parallel_residual=True,
    )


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(dev) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None


def _timed(fn, dev, repeats: int) -> tuple[float, float | None]:
    fn()  # burn-in (autotune, compile, allocator)
    _sync(dev)
    _peak_reset(dev)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], _peak_gb(dev)


def matmul_tflops(dev) -> float | None:
    if dev.type != "cuda":
        return None
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, quantiles=[0.5, 0.2, 0.8])[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def kernel_rate(L: int, dev, dtype) -> dict:
    """The statistics kernel alone on one Pythia layer's q, k."""
    from attnscope.kernels import AttnStatsSpec, KeyRanges, attn_stats

    H, D = 32, 80
    q = torch.randn(1, H, L, D, device=dev, dtype=dtype)
    k = torch.randn(1, H, L, D, device=dev, dtype=dtype)
    ranges = KeyRanges.full(1, L)
    fn = lambda: attn_stats(q, k, D**-0.5, ranges, AttnStatsSpec())  # noqa: E731
    flops = 2 * 2 * H * L * L * D / 2  # two passes over the causal half
    if dev.type == "cuda":
        from triton.testing import do_bench

        fn()
        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        sdpa = do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True), quantiles=[0.5, 0.2, 0.8]
        )
        return {"ms": med, "ms_p20": p20, "ms_p80": p80, "tflops": flops / (med * 1e-3) / 1e12, "sdpa_ms": sdpa[0]}
    t = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t) * 1e3
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a smoke run (default: 32)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-eager-above", type=int, default=16384, help="do not try eager attentions above this L")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import GPTNeoXForCausalLM

    import attnscope

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = pythia_config(args.layers)
    with torch.device(dev):
        model = GPTNeoXForCausalLM(cfg).to(dtype).eval()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": name,
        "dtype": str(dtype),
        "layers": cfg.num_hidden_layers,
        "torch": torch.__version__,
        "bf16_matmul_tflops": matmul_tflops(dev),
        "runs": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)

    class Tok:  # ids are random; the profiler tokenises text, so hand it a tokenizer that maps words to ids
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [int(w) for w in text.split()]}

        def decode(self, ids):
            return str(ids[0])

    eager_max = 0
    for L in [int(x) for x in args.lengths.split(",")]:
        row: dict = {"L": L}
        ids = torch.randint(0, cfg.vocab_size, (1, L), device=dev)
        text = " ".join(str(int(t)) for t in ids[0].tolist())

        def forward(ids=ids):
            with torch.no_grad():
                model(ids, use_cache=False)

        try:
            row["forward_s"], row["forward_peak_gb"] = _timed(forward, dev, args.repeats)
        except torch.OutOfMemoryError:
            row["forward"] = "out of memory"
        _peak_reset(dev)

        def prof(text=text):
            attnscope.profile(model, Tok(), [text], progress=False)

        try:
            row["profile_s"], row["profile_peak_gb"] = _timed(prof, dev, max(1, args.repeats - 1))
            if "forward_s" in row:
                row["profile_over_forward"] = row["profile_s"] / row["forward_s"]
                if row.get("forward_peak_gb"):
                    row["profile_peak_over_forward"] = row["profile_peak_gb"] / row["forward_peak_gb"]
        except torch.OutOfMemoryError:
            row["profile"] = "out of memory"
        _peak_reset(dev)

        if L <= args.skip_eager_above:
            model.set_attn_implementation("eager")
            try:

                def eager(ids=ids):
                    with torch.no_grad():
                        model(ids, use_cache=False, output_attentions=True)

                row["eager_s"], row["eager_peak_gb"] = _timed(eager, dev, 1)
                eager_max = max(eager_max, L)
            except torch.OutOfMemoryError:
                row["eager"] = "out of memory"
            finally:
                model.set_attn_implementation("sdpa")
                _peak_reset(dev)
        else:
            row["eager"] = f"not tried above {args.skip_eager_above} tokens"
        row["kernel"] = kernel_rate(L, dev, dtype)
        if result["bf16_matmul_tflops"]:
            row["kernel"]["fraction_of_matmul"] = row["kernel"]["tflops"] / result["bf16_matmul_tflops"]
        print(json.dumps(row), flush=True)
        result["runs"].append(row)
    result["eager_largest_L"] = eager_max
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu_pythia2.8b_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
