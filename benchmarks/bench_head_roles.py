"""What the head-role masses (duplicate-token and induction) cost in the CPU statistics pass.

Times ``attn_stats_torch`` on one SmolLM2-shaped layer (9 heads, 3 KV heads, d_head 64) at L tokens twice in the
same process: with the fused Numba pass as shipped, and with the same pass compiled from its own source minus the
two per-pair head-role tests. Medians of --repeats after a burn-in; writes benchmarks/results/head_roles.json.

    python benchmarks/bench_head_roles.py --length 2048
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from attnscope.kernels import AttnStatsSpec, KeyRanges, _cpu_fused, attn_stats_torch

_ROLE_LINES = """                dup += pd * (tok[j] == tq)
                ind += pd * (tokb[j] == tq)
"""


def _without_roles():
    """The fused pass compiled from its source without the per-pair head-role tests."""
    import numba

    src = inspect.getsource(_cpu_fused._fused_block_py)
    if _ROLE_LINES not in src:
        raise SystemExit("the fused pass changed: update _ROLE_LINES in this benchmark")
    ns = dict(vars(_cpu_fused), prange=numba.prange)
    exec(src.replace(_ROLE_LINES, ""), ns)  # noqa: S102 - our own source, minus four lines
    return numba.njit(parallel=True, nogil=True, error_model="numpy")(ns["_fused_block_py"])


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one burn-in call (which also compiles)."""
    fn()  # burn-in (and compilation)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "head_roles.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    L = args.length
    q, k = torch.randn(1, 9, L, 64), torch.randn(1, 3, L, 64)
    tokens = torch.randint(0, 200, (1, L))  # a small vocabulary: repeats are frequent, as in the worst case
    ranges, spec = KeyRanges.full(1, L), AttnStatsSpec()
    run = lambda: attn_stats_torch(q, k, 0.125, ranges, spec, tokens=tokens)  # noqa: E731
    _cpu_fused._kernel()
    shipped = _cpu_fused._compiled
    with_roles = median_time(run, args.repeats)
    _cpu_fused._compiled = _without_roles()
    try:
        without = median_time(run, args.repeats)
    finally:
        _cpu_fused._compiled = shipped
    res = {
        "what": "attn_stats_torch on one SmolLM2-shaped layer (B 1, H 9, H_kv 3, d_head 64), medians",
        "length": L,
        "threads": torch.get_num_threads(),
        "seconds_with_head_roles": with_roles,
        "seconds_without_head_roles": without,
        "overhead_per_layer": with_roles / without - 1,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    assert np.isfinite(with_roles)


if __name__ == "__main__":
    main()
