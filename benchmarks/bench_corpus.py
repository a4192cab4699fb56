"""Corpus benchmark: ``attnscope profile`` on two corpora against a plain SDPA forward, with the real SmolLM2-135M.

    python benchmarks/bench_corpus.py                    # the full measurement (tens of minutes on 2 CPU cores)
    python benchmarks/bench_corpus.py --scale 0.02 --out /tmp/bench.json   # a smoke run

Corpora (deterministic, seed 0):
    mixed     600 prompts, word counts log-uniform in [3, 300] (~60k tokens)
    oneliners 2,000 prompts of 4-16 words (~32k tokens)

For each corpus:
- forward: the model's plain forward (``attn_implementation="sdpa"``, lm_head included) over the same prompts in
  length-sorted batches of 16, in this process, after one burn-in batch; tokens/s.
- attnscope: ``attnscope profile --prompts FILE --batch-size auto --keep tables`` in a fresh subprocess (its peak RSS
  from ru_maxrss), minus attnscope's fixed cost, a one-prompt run in another subprocess (model load, Numba
  cache load, imports; measured after a first run that fills Numba's cache); tokens/s, peak RSS, bytes on disk
  per prompt and per token. The one-liner corpus is also run at 1/10 of its size, for the ratio of peak RSS
  (memory flat in corpus size).
Results go to --out (default benchmarks/results/cpu_corpus.json) with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from attnscope.profiler.bench import _WORDS as WORDS  # noqa: E402
from attnscope.profiler.bench import machine_info as machine  # noqa: E402

MORE = (
    "river stone light tree mountain city road window letter number market garden winter summer music paper "
    "engine signal energy water fire earth cloud story reason answer people family friend teacher student"
).split()


def corpus(kind: str, scale: float) -> list[str]:
    rnd = random.Random(0)
    vocab = WORDS + MORE
    if kind == "mixed":
        n, lo, hi = 600, 3, 300
        counts = [int(round(math.exp(rnd.uniform(math.log(lo), math.log(hi))))) for _ in range(n)]
    else:
        n = 2000
        counts = [rnd.randint(4, 16) for _ in range(n)]
    counts = counts[: max(1, int(round(len(counts) * scale)))]
    return [" ".join(rnd.choice(vocab) for _ in range(c)).capitalize() + "." for c in counts]


def forward_tokens_per_s(texts: list[str], batch: int = 16) -> tuple[float, int]:
    import torch

    from attnscope.profiler.models import load_model

    model, tok, _ = load_model(None, device="cpu", dtype="float32")
    model.config._attn_implementation = "sdpa"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    ids = [tok(t)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [[ids[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]

    def run(b):
        L = max(len(x) for x in b)
        x = torch.full((len(b), L), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros((len(b), L), dtype=torch.long)
        for r, seq in enumerate(b):
            x[r, : len(seq)] = torch.tensor(seq)
            m[r, : len(seq)] = 1
        with torch.no_grad():
            model(input_ids=x, attention_mask=m, use_cache=False)

    run(batches[0])  # burn-in
    t = time.perf_counter()
    for b in batches:
        run(b)
    dt = time.perf_counter() - t
    n_tok = sum(len(x) for x in ids)
    return n_tok / dt, n_tok


_CHILD = (
    "import resource, sys, time; t = time.perf_counter(); from attnscope.cli import main; rc = main(sys.argv[1:]); "
    "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


def profile_run(texts: list[str], work: Path, name: str, extra: list[str]) -> dict:
    f = work / f"{name}.txt"
    f.write_text("\n".join(texts) + "\n")
    out = work / f"run_{name}"
    argv = ["profile", "--prompts", str(f), "--out", str(out), "--batch-size", "auto", "--keep", "tables"]
    argv += ["--no-progress", *extra]
    r = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"attnscope profile failed: {r.stderr.strip().splitlines()[-1:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    doc = json.loads((out / "run.json").read_text())
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    accum = (out / doc["accum"]).stat().st_size
    res = {
        "prompts": doc["n_prompts"],
        "tokens": doc["n_tokens"],
        "seconds": float(line[1]),
        "peak_rss_mb": int(line[2]) / 1024,
        "disk_bytes": disk,
        "accum_bytes": accum,
        "disk_bytes_per_prompt_excl_accum": (disk - accum) / doc["n_prompts"],
        "disk_bytes_per_token_excl_accum": (disk - accum) / doc["n_tokens"],
    }
    shutil.rmtree(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each corpus (smoke runs: 0.02)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_corpus.json"))
    ap.add_argument("--extra", default="", help="more `attnscope profile` options, e.g. '--token-budget 4096'")
    args = ap.parse_args()
    extra = args.extra.split()
    result: dict = {"machine": machine(), "model": "SmolLM2-135M-Instruct (float32)", "scale": args.scale}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # a first run fills Numba's on-disk cache (a fresh install compiles the CPU kernels once, ~10 s); the
        # fixed cost is the second, what every later run pays
        profile_run(["One short prompt."], work, "warmup", extra)
        fixed = profile_run(["One short prompt."], work, "fixed", extra)
        result["fixed_cost"] = fixed
        print(f"fixed cost (load + one prompt): {fixed['seconds']:.1f} s, {fixed['peak_rss_mb']:.0f} MB", flush=True)
        for kind in ("mixed", "oneliners"):
            texts = corpus(kind, args.scale)
            fw, n_tok = forward_tokens_per_s(texts)
            run = profile_run(texts, work, kind, extra)
            net = run["seconds"] - fixed["seconds"]
            # a run shorter than the fixed cost (a smoke run, or a busy machine) has no meaningful rate
            rate = run["tokens"] / net if net > 0.1 * run["seconds"] else float("nan")
            r = {"forward_tokens_per_s": fw, "attnscope": run, "attnscope_tokens_per_s": rate}
            r["ratio_vs_forward"] = rate / fw
            if kind == "oneliners":
                small = profile_run(texts[: max(1, len(texts) // 10)], work, "oneliners_small", extra)
                r["attnscope_tenth"] = small
                r["peak_rss_ratio_full_vs_tenth"] = run["peak_rss_mb"] / small["peak_rss_mb"]
            result[kind] = r
            print(
                f"{kind}: {run['prompts']} prompts, {run['tokens']} tokens; forward {fw:,.0f} tok/s, attnscope "
                f"{r['attnscope_tokens_per_s']:,.0f} tok/s ({r['ratio_vs_forward']:.2f}x), peak RSS "
                f"{run['peak_rss_mb']:.0f} MB, {run['disk_bytes_per_prompt_excl_accum'] / 1024:.1f} KB per prompt "
                f"+ {run['accum_bytes'] / 1e6:.1f} MB accumulators",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
