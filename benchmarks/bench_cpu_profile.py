"""CPU benchmark: attnscope.profile against one plain SDPA forward of the real SmolLM2-135M.

    python benchmarks/bench_cpu_profile.py                # ~2k tokens: time ratio; ~8k tokens: peak RSS
    python benchmarks/bench_cpu_profile.py --tokens 2048 --repeats 3 --rss-tokens 8192

Times are medians over --repeats after one burn-in run (which also compiles the Numba loops). Peak RSS is
measured in fresh subprocesses (ru_maxrss), one for the plain forward and one for the profile, each loading
the model itself. Results go to benchmarks/results/cpu_smollm2.json with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = (
    "the history of science shows that careful measurement and simple models often explain more than "
    "elaborate theories when a question is posed clearly and the data are collected with care over many years"
).split()


def make_text(tok, n_tokens: int) -> str:
    """Deterministic English-like text of about ``n_tokens`` tokens."""
    import random

    rnd = random.Random(0)
    words = []
    while True:
        words.extend(rnd.choice(WORDS) for _ in range(256))
        text = " ".join(words)
        n = len(tok(text)["input_ids"])
        if n >= n_tokens:
            ids = tok(text)["input_ids"][:n_tokens]
            return tok.decode(ids)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _rss_child(mode: str, n_tokens: int) -> None:
    """Run in a fresh process: load the model, run one forward or profile, print peak RSS in MB."""
    import torch
    from attnscope.profiler.models import load_model

    import attnscope

    model, tok, _ = load_model(None, device="cpu", dtype="float32")
    text = make_text(tok, n_tokens)
    ids = tok(text, return_tensors="pt")["input_ids"]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            model(ids)
    else:
        attnscope.profile(model, tok, [text], progress=False)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"mode": mode, "tokens": int(ids.shape[1]), "peak_rss_mb": peak, "rss_after_load_mb": base, "seconds": dt}
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-tokens", type=int, default=8192)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_smollm2.json"))
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        _rss_child(args._child[0], int(args._child[1]))
        return

    import torch
    from attnscope.profiler.models import load_model

    import attnscope

    model, tok, _ = load_model(None, device="cpu", dtype="float32")
    text = make_text(tok, args.tokens)
    ids = tok(text, return_tensors="pt")["input_ids"]
    L = int(ids.shape[1])

    def forward():
        with torch.no_grad():
            model(ids)

    def prof():
        attnscope.profile(model, tok, [text], progress=False)

    result = {"machine": machine(), "model": "SmolLM2-135M-Instruct (float32)", "tokens": L}
    t = time.perf_counter()
    prof()  # burn-in: Numba compile (or cache load) + allocator warm-up
    result["burn_in_profile_s"] = time.perf_counter() - t
    forward()
    fw, pr = [], []
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
        t = time.perf_counter()
        forward()
        fw.append(time.perf_counter() - t)
        t = time.perf_counter()
        prof()
        pr.append(time.perf_counter() - t)
    result |= {
        "forward_s": fw,
        "profile_s": pr,
        "forward_median_s": statistics.median(fw),
        "profile_median_s": statistics.median(pr),
    }
    result["ratio_profile_over_forward"] = result["profile_median_s"] / result["forward_median_s"]
    print(
        f"{L} tokens: forward {result['forward_median_s']:.2f} s, profile {result['profile_median_s']:.2f} s, "
        f"ratio {result['ratio_profile_over_forward']:.2f}",
        flush=True,
    )

    if args.rss_tokens:
        rss = {}
        for mode in ("forward", "profile"):
            res = subprocess.run(
                [sys.executable, __file__, "--_child", mode, str(args.rss_tokens)], capture_output=True, text=True
            )
            if res.returncode != 0:
                rss[mode] = {"error": res.stderr.strip().splitlines()[-1:]}
            else:
                rss[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{args.rss_tokens} tokens, {mode}: {rss[mode]}", flush=True)
        result["rss"] = rss
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
