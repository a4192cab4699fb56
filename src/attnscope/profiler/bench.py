"""``attnscope bench``: a plain SDPA forward against ``attnscope.profile`` (and eager ``output_attentions``), time and
peak memory at each context length, on the user's own machine.

Every measurement runs in a fresh subprocess that loads the model itself, runs one burn-in and then ``repeats``
timed runs (median reported), and reports its peak memory: the process's peak RSS (``ru_maxrss``, model load
included) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Eager ``output_attentions`` keeps every layer's
[heads, L, L] matrix; its memory is predicted from the geometry first and the run skipped, with the reason, where
it cannot fit, rather than left for the operating system to kill.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["BenchConfig", "machine_info", "plot_bench", "predict_eager_bytes", "run_bench", "write_bench"]

MODES = ("forward", "profile", "eager")
_WORDS = (
    "the history of science shows that careful measurement and simple models often explain more than "
    "elaborate theories when a question is posed clearly and the data are collected with care over many years"
).split()


def _option(default, help: str):
    """A field with its default and its help: ``attnscope bench --help`` shows both (see cli/bench.py)."""
    return field(default=default, metadata={"help": help})


@dataclass
class BenchConfig:
    """What to measure. Each field's ``metadata["help"]`` is its one description, worded for
    ``attnscope bench --help`` (which appends the default)."""

    model: str | None = _option(None, "as ``attnscope profile`` takes it; None: the default model")
    lengths: list[int] = field(
        default_factory=lambda: [2048, 8192], metadata={"help": "comma-separated prompt lengths in tokens"}
    )
    device: str = _option("auto", "auto, cpu or cuda[:N]")
    dtype: str = _option("auto", "model dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    repeats: int = _option(3, "timed runs after one burn-in; the median is reported")
    eager: bool = _option(True, "also run eager output_attentions where it is predicted to fit")
    threads: int | None = _option(None, "CPU threads for torch and the Numba statistics (default: torch's)")
    timeout_s: float = _option(3600.0, "seconds each measurement subprocess may run")

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths must be integers >= 2, got {self.lengths}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, library versions and (on CUDA) the GPU, for the results file."""
    import torch

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = sorted(x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "fma", "amx")))
                    break  # after the model name
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_flags": flags,  # the vector extensions the CPU reports
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch chose for it
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return info


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _total_memory() -> int | None:
    return _meminfo("MemTotal")


def _available_memory(device: str) -> int | None:
    """Bytes a new process may still allocate on ``device`` (None: unknown)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return _meminfo("MemAvailable")


def predict_eager_bytes(geom: dict, n_params: int, vocab: int, length: int, itemsize: int) -> int:
    """Peak memory of one eager forward with ``output_attentions`` on one prompt of ``length`` tokens.

    Every layer's attention [heads, L, L] is kept until the end; one layer also holds its scores and softmax
    while it runs (two more such matrices, in fp32), and the logits [L, vocab] come last. Weights included.
    """
    H, Ly = geom["n_heads"], geom["n_layers"]
    square = H * length * length
    return n_params * itemsize + Ly * square * itemsize + 2 * square * 4 + length * vocab * 4


def _make_ids(tok, n_tokens: int):
    """A deterministic English-like prompt of exactly ``n_tokens`` tokens, as ids [1, n_tokens]."""
    import random

    import torch

    rnd = random.Random(0)
    words: list[str] = []
    while True:
        words.extend(rnd.choice(_WORDS) for _ in range(max(64, n_tokens // 2)))
        ids = tok(" ".join(words))["input_ids"]
        if len(ids) >= n_tokens:
            return torch.tensor([ids[:n_tokens]])


def _child(spec: dict) -> dict:
    """One measurement (runs in its own process): load, burn in, time ``repeats`` runs, report peak memory."""
    import torch

    import attnscope
    from attnscope.kernels import set_cpu_threads
    from attnscope.profiler.models import load_model

    set_cpu_threads(spec["threads"])
    mode, L = spec["mode"], spec["length"]
    model, tok, model_id = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"])
    if mode == "eager":
        model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ids = _make_ids(tok, L).to(device)
    text = tok.decode(ids[0])
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    n_tokens = [L]

    def once():
        if mode == "profile":
            # the profile re-tokenises the decoded text (special tokens added as the tokenizer does)
            prof = attnscope.profile(model, tok, [text], progress=False, allow_long=True, threads=spec["threads"])
            n_tokens[0] = prof.prompts[0]["n_tokens"]
        else:
            with torch.no_grad():
                model(ids, output_attentions=mode == "eager")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t = time.perf_counter()
    once()
    sync()
    burn_in = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t)
    out = {
        "mode": mode,
        "tokens": n_tokens[0],
        "burn_in_s": burn_in,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": rss_after_load,
    }
    if cuda:
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    if mode == "forward":  # the geometry, for the eager prediction and the results file
        from attnscope.profiler.blocks import model_geometry

        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        out["model"] = model_geometry(model) | {
            "model_id": model_id,
            "n_params": sum(p.numel() for p in model.parameters()),
            "vocab": cfg.vocab_size,
            "itemsize": next(model.parameters()).element_size(),
        }
    return out


def _measure(cfg: BenchConfig, mode: str, length: int, log) -> dict:
    spec = {
        "mode": mode,
        "length": length,
        "model": cfg.model,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "repeats": cfg.repeats,
        "threads": cfg.threads,
    }
    cmd = [sys.executable, "-m", "attnscope.profiler.bench", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "tokens": length, "error": f"timed out after {cfg.timeout_s:.0f} s"}
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines:
        why = res.stderr.strip().splitlines()[-1:] or [f"exit status {res.returncode}"]
        if res.returncode < 0:
            why = [f"killed by signal {-res.returncode}"]
        return {"mode": mode, "tokens": length, "error": why[0]}
    return json.loads(lines[-1])


def run_bench(cfg: BenchConfig, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Measure every mode at every length; returns the results (also what ``attnscope bench`` writes as JSON)."""
    device = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and _cuda()) else "cpu"
    result = {
        "machine": machine_info(cfg.device if device == "cuda" else "cpu"),
        "config": asdict(cfg),
        "model": {"model_id": cfg.model},
        "memory_metric": "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of the process",
        "runs": [],
    }
    eager_failed = False
    for L in cfg.lengths:
        row: dict = {"tokens": L}
        for mode in MODES:
            if mode == "eager":
                if not cfg.eager:
                    continue
                if eager_failed:
                    row[mode] = {"skipped": "eager failed at a shorter length"}
                    continue
                geom = result["model"]
                need = None
                if "n_params" in geom:
                    need = predict_eager_bytes(geom, geom["n_params"], geom["vocab"], L, geom["itemsize"])
                    row["eager_predicted_bytes"] = need
                avail = _available_memory(cfg.device if device == "cuda" else "cpu")
                if need is not None and avail is not None and need > 0.9 * avail:
                    row[mode] = {
                        "skipped": f"predicted {need / 2**30:.1f} GiB for the attention matrices of every layer, "
                        f"more than the {avail / 2**30:.1f} GiB available"
                    }
                    log(f"{L} tokens, eager: skipped ({row[mode]['skipped']})")
                    continue
            r = _measure(cfg, mode, L, log)
            if mode == "forward" and "error" in r and not result["runs"]:
                raise RuntimeError(f"the plain forward of {cfg.model or 'the default model'} failed: {r['error']}")
            if "model" in r:
                result["model"] = r.pop("model")
            row[mode] = r
            if mode == "eager" and "error" in r:
                eager_failed = True
            log(f"{L} tokens, {mode}: " + (r.get("error") or _summary(r, device)))
        fw, pr = row.get("forward", {}), row.get("profile", {})
        if "median_s" in fw and "median_s" in pr:
            row["time_ratio_profile_over_forward"] = pr["median_s"] / fw["median_s"]
            key = "peak_cuda_bytes" if device == "cuda" else "peak_rss_bytes"
            row["memory_ratio_profile_over_forward"] = pr[key] / fw[key]
        result["runs"].append(row)
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _summary(r: dict, device: str) -> str:
    mem = r.get("peak_cuda_bytes") if device == "cuda" else r["peak_rss_bytes"]
    return f"median {r['median_s']:.3f} s over {len(r['times_s'])}, peak {mem / 2**30:.2f} GiB"


def plot_bench(result: dict, path: Path) -> Path:
    """Time and peak memory against length, one line per mode (skipped or failed points left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = result["memory_metric"].startswith("torch.cuda")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        pts = [(row["tokens"], row[mode]) for row in result["runs"] if "median_s" in row.get(mode, {})]
        if not pts:
            continue
        x = [p[0] for p in pts]
        axes[0].plot(x, [p[1]["median_s"] for p in pts], marker="o", label=mode)
        mem = [p[1]["peak_cuda_bytes" if cuda else "peak_rss_bytes"] / 2**30 for p in pts]
        axes[1].plot(x, mem, marker="o", label=mode)
    for ax, label in zip(axes, ("median time (s)", f"peak memory (GiB, {result['memory_metric']})")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    m = result["machine"]
    isa = "" if m.get("gpu") or not m.get("cpu_capability") else f", {m['cpu_capability']}"
    fig.suptitle(
        f"{result['model'].get('model_id')} on {m.get('gpu') or m['cpu']} ({m['cores']} cores{isa})", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_bench(result: dict, out: Path) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "bench.json"
    js.write_text(json.dumps(result, indent=1) + "\n")
    return js, plot_bench(result, out / "bench.png")


if __name__ == "__main__":  # one measurement, in its own process
    print(json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
