"""What a GPU machine offers before anything runs on it: the GPU, the driver, library versions, the SDPA kernel torch
picks for Pythia-2.8B's attention and which op will give attnscope the forward's log-sum-exp.

    python benchmarks/gpu_probe.py --out probe.json          # exits 2 at once where torch sees no CUDA device
    python benchmarks/gpu_probe.py --device cpu --out p.json # the same questions on the CPU (a dry run)

At each head size (64, 80, 128) it runs the chosen lse op once next to the plain call, bf16, causal, and records
whether their outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict:
    """Python and the libraries the GPU paths use (None: not installed)."""
    import importlib

    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "numpy", "numba", "pyarrow", "pandas", "scipy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return out


def gpu_info(dev) -> dict:
    """The device: name, memory, compute capability (the CPU model on a CPU)."""
    import torch

    if dev.type != "cuda":
        return {"device": f"cpu: {platform.processor() or platform.machine()} (no GPU)", "cores": os.cpu_count()}
    p = torch.cuda.get_device_properties(dev)
    return {
        "device": torch.cuda.get_device_name(dev),
        "memory_gib": round(p.total_memory / 2**30, 1),
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "driver": _driver(),
    }


def sdpa_choice(dev, dtype, heads: int = 32, length: int = 2048, head_dim: int = 80, check: bool = True) -> dict:
    """torch's SDPA kernel for causal attention of this shape, the lse op attnscope takes, and (``check``) whether
    that op's output is bit-identical to the plain call's."""
    import torch

    from attnscope.profiler import hooks

    q, k, v = (torch.randn(1, heads, length, head_dim, device=dev, dtype=dtype) for _ in range(3))
    backend = hooks.sdpa_backend(q, k, v, None, 0.0, True)
    row = {
        "shape": [1, heads, length, head_dim],
        "dtype": str(dtype).removeprefix("torch."),
        "sdpa_backend": hooks.SDP_BACKENDS.get(backend, backend),
        "lse_op": hooks.lse_op(backend, dev.type, False, head_dim),
    }
    mask = torch.ones(1, 1, length, length, device=dev, dtype=torch.bool).tril()
    masked = hooks.sdpa_backend(q, k, v, mask, 0.0, False)
    row["sdpa_backend_masked"] = hooks.SDP_BACKENDS.get(masked, masked)
    row["lse_op_masked"] = hooks.lse_op(masked, dev.type, True, head_dim)
    if check:
        with torch.no_grad():
            plain = hooks._SDPA(q, k, v, is_causal=True)
            out, lse, source = hooks._attention_with_lse(q, k, v, None, 0.0, True, None, False)
        row["lse_source"] = source
        if out is not None:
            row["bit_identical"] = bool(torch.equal(out, plain))
            row["max_abs_diff"] = float((out.float() - plain.float()).abs().max())
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_probe: torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): nothing on this machine can be "
            "measured on a GPU; `bash benchmarks/gpu_check.sh --dry-run` runs every step on the CPU",
            file=sys.stderr,
        )
        return 2
    dev = torch.device(args.device)
    res = {**gpu_info(dev), "versions": versions(), "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    dtype = torch.bfloat16
    res["sdpa"] = [sdpa_choice(dev, dtype, head_dim=d, check=True) for d in (80, 64, 128)]
    try:
        import attnscope.kernels.qk_stats  # noqa: F401  (the Triton kernels import: triton is usable)

        res["triton_kernels_import"] = True
    except ImportError as e:
        res["triton_kernels_import"] = f"{type(e).__name__}: {e}"
    # the GPU image has none of these: the GPU paths must not import them
    res["optional_modules_loaded"] = [m for m in ("gguf", "duckdb", "plotly", "ray", "datasets") if m in sys.modules]
    res["probe_s"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(res, indent=1)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    pythia = res["sdpa"][0]
    print(
        f"gpu_probe: {res['device']}; torch {res['versions']['torch']}, triton {res['versions']['triton']}, "
        f"cuDNN {res['versions']['cudnn']}; Pythia-2.8B attention runs SDPA's {pythia['sdpa_backend']} kernel, "
        f"lse from {pythia['lse_op'] or 'none (the statistics compute it)'}"
        + (f", bit-identical: {pythia.get('bit_identical')}" if "bit_identical" in pythia else ""),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
