"""CPU benchmark: attnscope.profile against a plain SDPA forward of the real SmolLM2-135M, through ``attnscope bench``.

    python benchmarks/bench_cpu_profile.py                          # 2,048 and 8,192 tokens
    python benchmarks/bench_cpu_profile.py --lengths 2048 --repeats 5 --threads 2

Each measurement runs in a fresh process (``attnscope.profiler.bench``): one burn-in (which also loads the Numba
cache), then the median of --repeats runs, and the peak RSS of that process (model load included). Eager
output_attentions is skipped by default here (--eager to include it). Results go to
benchmarks/results/cpu_smollm2.json (+ .png) with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    from attnscope.profiler.bench import BenchConfig, run_bench, write_bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eager", action="store_true", help="also run eager output_attentions where it fits")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_smollm2.json"))
    args = ap.parse_args()

    cfg = BenchConfig(
        model=None,
        lengths=[int(x) for x in args.lengths.split(",")],
        device="cpu",
        dtype="float32",
        repeats=args.repeats,
        eager=args.eager,
        threads=args.threads,
    )
    result = run_bench(cfg)
    out = Path(args.out)
    tmp = out.parent / (out.stem + ".d")
    js, png = write_bench(result, tmp)
    shutil.move(js, out)
    shutil.move(png, out.with_suffix(".png"))
    tmp.rmdir()
    for row in result["runs"]:
        fw, pr = row["forward"], row["profile"]
        if "median_s" in fw and "median_s" in pr:
            print(
                f"{row['tokens']} tokens: forward {fw['median_s']:.2f} s, {fw['peak_rss_bytes'] / 2**30:.2f} GiB; "
                f"profile {pr['median_s']:.2f} s, {pr['peak_rss_bytes'] / 2**30:.2f} GiB; "
                f"ratio {row['time_ratio_profile_over_forward']:.2f}x"
            )
    print(json.dumps(result["machine"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
