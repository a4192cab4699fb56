"""What the head-role masses (duplicate-token and induction) cost in the CPU statistics pass, real SmolLM2-135M.

    python benchmarks/bench_head_roles.py --length 2048

One forward of SmolLM2-135M (float32) over the first --length tokens of this repository's README captures every
layer's q, k and the forward's lse (``attnscope.profiler.capture``). The statistics of all layers
(``attn_stats_torch`` with the profiler's defaults, the fused Numba pass) are then timed on those q and k with three
token streams:

- ``none``: no token repeats (``tokens=None``: positions). The head-role code finds no earlier copy and does one
  test per row: the pass without the masses, up to that O(L) per layer against O(L^2) for the rest;
- ``text``: the prompt's own tokens, what the profiler passes;
- ``frequent``: two token ids at random, so every token has many earlier copies and each row compares every key
  (the most the masses can cost).

The three alternate within each repeat; one burn-in each (Numba compiles or loads its cache), then the median of
--repeats, with the min and max (the machine's noise next to the difference). The whole profile of the same prompt
(``attnscope.profile``, median of --repeats after a burn-in) gives the masses' share of it. Writes
benchmarks/results/head_roles.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import attnscope
from attnscope.kernels import KeyRanges, attn_stats_torch
from attnscope.profiler import capture
from attnscope.profiler.bench import machine_info
from attnscope.profiler.config import ProfileConfig
from attnscope.profiler.models import load_model

README = Path(__file__).resolve().parents[1] / "README.md"


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one burn-in call (which also compiles)."""
    fn()  # burn-in (and compilation)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _prompt(tok, length: int) -> tuple[str, torch.Tensor]:
    """The first ``length`` tokens of the README as text, and its ids [1, L] (decoded and re-encoded, so the text
    the profiler tokenizes gives exactly these ids)."""
    ids = tok(README.read_text())["input_ids"][:length]
    text = tok.decode(ids)
    ids = tok(text)["input_ids"][:length]
    return tok.decode(ids), torch.tensor([ids])


def _capture_layers(model, ids: torch.Tensor) -> list[tuple]:
    """Every layer's (q [1, H, L, D], k [1, H_kv, L, D], scaling, window, lse [1, H, L] or None) from one forward."""
    layers: dict[int, tuple] = {}

    def on_attention(layer, q, k, scaling, window, lse):
        layers[layer] = (q.detach().clone(), k.detach().clone(), scaling, window, None if lse is None else lse.clone())

    with torch.no_grad(), capture(model, on_attention):
        model(input_ids=ids, use_cache=False)
    return [layers[i] for i in sorted(layers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "head_roles.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, model_id = load_model(None, device="cpu", dtype="float32")
    text, ids = _prompt(tok, args.length)
    L = ids.shape[1]
    layers = _capture_layers(model, ids)
    cfg = ProfileConfig()
    streams = {"none": None, "text": ids, "frequent": torch.randint(0, 2, (1, L))}

    def stats_pass(tokens):
        for q, k, scaling, window, lse in layers:
            ranges = KeyRanges.full(1, L, window)
            attn_stats_torch(q, k, scaling, ranges, cfg.spec, block_q=cfg.block_q, tokens=tokens, lse=lse)

    times: dict[str, list[float]] = {name: [] for name in streams}
    for tokens in streams.values():  # burn-in
        stats_pass(tokens)
    for _ in range(args.repeats):
        for name, tokens in streams.items():
            t0 = time.perf_counter()
            stats_pass(tokens)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    kw = dict(progress=False, model_id=model_id, batch_size=1)
    profile_s = median_time(lambda: attnscope.profile(model, tok, [text], **kw), args.repeats)

    _, H, _, D = layers[0][0].shape
    Hkv = layers[0][1].shape[1]
    seen: set[int] = set()
    n_seen = 0  # positions whose token occurred earlier in the prompt
    for t in ids[0].tolist():
        n_seen += t in seen
        seen.add(t)
    res = {
        "what": f"attn_stats_torch over every layer of {model_id} float32 ({len(layers)} layers, H {H}, H_kv {Hkv}, "
        f"d_head {D}), q/k/lse of one forward, medians (s); tokens none / the text's own / two ids at random",
        "prompt": f"the first {L} tokens of README.md",
        "tokens": L,
        "tokens_seen_before": n_seen / L,
        "lse_from_forward": layers[0][4] is not None,
        "repeats": args.repeats,
        "stats_s": med,
        "stats_s_min_max": {name: [min(t), max(t)] for name, t in times.items()},
        "stats_per_layer_ms": {name: 1e3 * t / len(layers) for name, t in med.items()},
        "overhead_of_stats_text": med["text"] / med["none"] - 1,
        "overhead_of_stats_frequent": med["frequent"] / med["none"] - 1,
        "profile_s": profile_s,
        "share_of_profile_text": (med["text"] - med["none"]) / profile_s,
        "share_of_profile_frequent": (med["frequent"] - med["none"]) / profile_s,
        "machine": machine_info("cpu"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
