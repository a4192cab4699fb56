"""GPU benchmark: Pythia-2.8B's exact geometry (random bf16 weights, built on the GPU) at long contexts, in one run.

    python benchmarks/bench_gpu_pythia.py --out pythia.json                     # L = 2048, 8192, 32768 on cuda
    python benchmarks/bench_gpu_pythia.py --tiny --layers 2 --lengths 64,128 --device cpu --out p.json  # anywhere

For each L, one prompt: the plain SDPA forward (time, peak memory); ``attnscope.profile`` (time, peak memory, which
op gave the forward's log-sum-exp, or why none did); the attention-statistics pass alone on one layer's q, k (with
the forward's lse: one pass over the causal half; without: two), in (query, key) pairs per second and as a share of
the bf16 matmul rate measured in the same run (2 * d_head flops a pair and pass); HF eager ``output_attentions``
only where its predicted memory fits (else the reason). Whole-model runs: one burn-in (compiles the kernels), then
the median of ``--repeats`` synchronised wall-clock runs (one run where the burn-in took longer than
``--long-s``); the kernel alone: ``triton.testing.do_bench`` (CUDA events, median with p20/p80).

The JSON (the device, torch/triton/transformers/cuDNN versions, the SDPA kernel torch picks) is rewritten after
every measurement, so a run cut short keeps what it finished. ``--budget-s`` stops starting new measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_probe import gpu_info, sdpa_choice, versions  # noqa: E402


def pythia_config(layers: int | None, tiny: bool = False):
    """Pythia-2.8B (32 layers, 32 heads, d_head 80, d_ff 10240); ``tiny``: 4 heads of 80 and a small vocabulary."""
    from transformers import GPTNeoXConfig

    common = dict(rotary_pct=0.25, use_parallel_residual=True)
    if tiny:  # d_head 80 as in Pythia-2.8B, 2 layers of 4 heads
        return GPTNeoXConfig(
            vocab_size=512, hidden_size=320, num_hidden_layers=layers or 2, num_attention_heads=4,
            intermediate_size=1280, max_position_embeddings=4096, **common,
        )  # fmt: skip
    return GPTNeoXConfig(
        vocab_size=50304, hidden_size=2560, num_hidden_layers=layers or 32, num_attention_heads=32,
        intermediate_size=10240, max_position_embeddings=32768, **common,
    )  # fmt: skip


class Tok:
    """A tokenizer stand-in for random ids: the text is the ids written out, one word each."""

    pad_token_id, eos_token_id = 0, 0
    name_or_path = "ids-as-words"

    def __call__(self, texts, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": [int(w) for w in texts.split()]}
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, seqs):
        return [self.decode(s) for s in seqs]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(dev) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if dev.type == "cuda" else None


def _timed(fn, dev, repeats: int, long_s: float) -> dict:
    """One burn-in, then the median of ``repeats`` synchronised runs (one where the burn-in took over ``long_s``)."""
    _peak_reset(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    burn = time.perf_counter() - t
    n = 1 if burn > long_s else repeats
    times = []
    for _ in range(n):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return {
        "s": round(sorted(times)[len(times) // 2], 4),
        "burn_in_s": round(burn, 3),
        "runs": n,
        "peak_gb": _peak_gb(dev),
    }


def matmul_tflops(dev, dtype) -> float:
    """The measured dense matmul rate in ``dtype`` (8192^3 on a GPU, 1024^3 on the CPU)."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return round(2 * n**3 / (_bench_ms(lambda: a @ b, dev)[0] * 1e-3) / 1e12, 3)


def _bench_ms(fn, dev) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def stats_pass(L: int, H: int, D: int, dev, dtype, matmul: float) -> dict:
    """The attention-statistics pass alone on one layer's q, k (causal, one prompt), with and without the lse."""
    from attnscope.kernels import AttnStatsSpec, KeyRanges, attn_stats
    from attnscope.profiler import hooks

    q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=dtype) for _ in range(3))
    ranges = KeyRanges.full(1, L)
    spec = AttnStatsSpec()
    pairs = H * L * (L + 1) / 2
    with torch.no_grad():
        _, lse, source = hooks._attention_with_lse(q, k, v, None, 0.0, True, None, False)
    out = {
        "pairs": pairs,
        "lse_source": source,
        "sdpa_ms": round(_bench_ms(lambda: hooks._SDPA(q, k, v, is_causal=True), dev)[0], 3),
    }
    for name, given, passes in (("own_lse", None, 2), ("forward_lse", lse, 1)):
        if name == "forward_lse" and lse is None:
            out[name] = f"not measured: {source}"
            continue
        med, p20, p80 = _bench_ms(lambda given=given: attn_stats(q, k, D**-0.5, ranges, spec, lse=given), dev)
        tflops = pairs * 2 * D * passes / (med * 1e-3) / 1e12
        out[name] = {
            "ms": round(med, 3),
            "ms_p20": round(p20, 3),
            "ms_p80": round(p80, 3),
            "pairs_per_s": float(f"{pairs / (med * 1e-3):.4g}"),
            "qk_tflops": round(tflops, 3),
            "share_of_matmul": round(tflops / matmul, 4) if matmul else None,
        }
    return out


def eager_fits(model, cfg, L: int, dev, dtype) -> tuple[bool, str]:
    """Whether HF eager ``output_attentions`` at ``L`` is predicted to fit in what the device has left."""
    from attnscope.profiler.bench import _available_memory, predict_eager_bytes
    from attnscope.profiler.blocks import model_geometry

    n_params = sum(p.numel() for p in model.parameters())
    itemsize = torch.finfo(dtype).bits // 8
    need = predict_eager_bytes(model_geometry(model), n_params, cfg.vocab_size, L, itemsize)
    free = _available_memory(str(dev))
    have = (free or 0) + n_params * itemsize  # the weights are already in place
    if free is None or need > 0.9 * have:
        return False, f"predicted {need / 1e9:.1f} GB, the device has {have / 1e9:.1f} GB"
    return True, f"predicted {need / 1e9:.1f} GB of {have / 1e9:.1f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a smoke run (default: 32)")
    ap.add_argument("--tiny", action="store_true", help="4 heads of 80, d_model 320, vocabulary 512 (a dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-s", type=float, default=20.0, help="one timed run where the burn-in took longer")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new measurement after this many seconds")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/gpu_pythia2.8b_<device>.json")
    args = ap.parse_args()
    t_start = time.perf_counter()

    from transformers import GPTNeoXForCausalLM

    import attnscope
    from attnscope.profiler import hooks

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_pythia: torch sees no CUDA device (--device cpu runs it on the CPU)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu_pythia2.8b_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = pythia_config(args.layers, args.tiny)
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    result = {
        "benchmark": "bench_gpu_pythia",
        "geometry": "tiny (4 heads of 80)" if args.tiny else "Pythia-2.8B",
        **gpu_info(dev),
        "versions": versions(),
        "dtype": str(dtype).removeprefix("torch."),
        "layers": cfg.num_hidden_layers,
        "heads": H,
        "head_dim": D,
        "sdpa": sdpa_choice(dev, dtype, H, 2048, D, check=False),
        "runs": [],
    }

    def write():
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

    result["matmul_tflops"] = matmul_tflops(dev, dtype)
    write()
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)

    torch.manual_seed(0)
    t = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = GPTNeoXForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation("sdpa")
    result["model_build_s"] = round(time.perf_counter() - t, 2)
    result["n_params"] = sum(p.numel() for p in model.parameters())
    write()

    for L in [int(x) for x in args.lengths.split(",")]:
        row: dict = {"L": L}
        result["runs"].append(row)
        if over_budget():
            row["skipped"] = f"time budget ({args.budget_s} s) spent"
            write()
            print(json.dumps(row), flush=True)
            continue
        ids = torch.randint(0, cfg.vocab_size, (1, L), device=dev)
        text = " ".join(str(int(t)) for t in ids[0].tolist())

        def forward(ids=ids):
            with torch.no_grad():
                model(ids, use_cache=False)

        try:
            row["forward"] = _timed(forward, dev, args.repeats, args.long_s)
        except torch.OutOfMemoryError:
            row["forward"] = "out of memory"
        _peak_reset(dev)
        write()

        def prof(text=text):
            attnscope.profile(model, Tok(), [text], progress=False)

        try:
            with hooks.lse_sources() as sources:
                row["profile"] = _timed(prof, dev, max(1, args.repeats - 1), args.long_s)
            row["lse_sources"] = dict(sources)  # calls over the burn-in and the timed runs
            fw, pr = row["forward"], row["profile"]
            if isinstance(fw, dict):
                row["profile_over_forward"] = round(pr["s"] / fw["s"], 3)
                if fw["peak_gb"]:
                    row["profile_peak_over_forward"] = round(pr["peak_gb"] / fw["peak_gb"], 3)
        except torch.OutOfMemoryError:
            row["profile"] = "out of memory"
        _peak_reset(dev)
        write()

        if not over_budget():
            try:
                row["stats_pass"] = stats_pass(L, H, D, dev, dtype, result["matmul_tflops"])
            except torch.OutOfMemoryError:
                row["stats_pass"] = "out of memory"
            _peak_reset(dev)
            write()

        fits, why = eager_fits(model, cfg, L, dev, dtype)
        if not fits or over_budget():
            row["eager"] = f"not tried: {why}" if not fits else "not tried: time budget spent"
        else:
            model.set_attn_implementation("eager")
            try:

                def eager(ids=ids):
                    with torch.no_grad():
                        model(ids, use_cache=False, output_attentions=True)

                row["eager"] = _timed(eager, dev, 1, args.long_s) | {"predicted": why}
            except torch.OutOfMemoryError:
                row["eager"] = f"out of memory ({why})"
            finally:
                model.set_attn_implementation("sdpa")
                _peak_reset(dev)
        write()
        print(json.dumps(row), flush=True)
    done = [r["L"] for r in result["runs"] if isinstance(r.get("eager"), dict)]
    result["eager_largest_L"] = max(done, default=None)
    write()
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
