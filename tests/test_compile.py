"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80), with no GPU.

``kernels/_compile_check.py`` runs triton's whole pipeline down to a cubin (the triton wheel carries ptxas) at the
configurations the launchers pick, in a subprocess without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit``
returns a Python function that cannot be compiled). Once with the installed triton and once with triton 3.6.0, the
version of the GPU image, in a side environment this test creates in the cache on first use. Each configuration
prints its registers, spill bytes and SASS size (``pytest -s`` shows them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "src" / "attnscope" / "kernels" / "_compile_check.py"
SIDE_TRITON = "3.6.0"  # the GPU image's triton

# (arch, configuration names of _compile_check.CONFIGS): one or two per kernel keep the suite fast
INSTALLED = [
    (90, ["qk_stats_d80_bf16", "qk_stats_lse_d128_bf16", "down_proj_pythia_bf16"]),
    (90, ["qk_stats_softcap_sliding_d256_bf16", "qk_stats_d192_bf16", "qk_stats_sinks_sliding_d64_bf16"]),
    (90, ["qk_stats_chunked_d128_bf16", "vocab_stats_softcap_bf16"]),
    (80, ["qk_stats_d64_fp16", "qk_stats_d64_fp32", "down_proj_smollm2_fp32"]),
]
SIDE = [
    (90, ["qk_stats_d80_bf16", "qk_stats_d128_bf16", "qk_stats_lse_d80_bf16", "down_proj_pythia_bf16"]),
    (90, ["qk_stats_softcap_sliding_d256_bf16", "qk_stats_d192_bf16", "qk_stats_sinks_sliding_d64_bf16"]),
    (90, ["qk_stats_chunked_d128_bf16", "vocab_stats_bf16", "vocab_stats_softcap_bf16"]),
]


def _compile(python: str, arch: int, names: list[str], env: dict[str, str] | None = None) -> list[dict]:
    env = env or {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [python, str(SCRIPT), "--json", "--arch", str(arch)] + [a for n in names for a in ("--only", n)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        print(" ".join(f"{k}={v}" for k, v in r.items() if k != "error"))
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    assert proc.returncode == 0 and len(rows) == len(names), proc.stderr[-4000:]
    for r in rows:
        assert r["regs"] > 0 and r["sass"] > 0, r  # ptxas reported and the cubin disassembled
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['name']} spills on sm_{arch}: {r}"
    return rows


@pytest.mark.parametrize("arch, names", INSTALLED, ids=[f"sm{a}-{i}" for i, (a, _) in enumerate(INSTALLED)])
def test_kernels_compile_with_installed_triton(arch, names):
    _compile(sys.executable, arch, names)


def _side_env() -> dict[str, str]:
    """The environment of a Python with triton 3.6.0 that sees this interpreter's packages (torch included), whether
    this interpreter is the system's Python or a virtual environment: a venv in the cache, made once per base
    interpreter, that holds triton only, run with ``PYTHONPATH`` = its own site-packages, then this interpreter's."""
    from attnscope import cache_dir

    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    tag = hashlib.sha1(base.encode()).hexdigest()[:10]
    env_dir = cache_dir() / f"triton-{SIDE_TRITON}-py{sys.version_info[0]}{sys.version_info[1]}-{tag}"
    python = env_dir / "bin" / "python"
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ready = env_dir / "ready"
    if not (ready.exists() and Path(ready.read_text()).is_dir()):
        shutil.rmtree(env_dir, ignore_errors=True)  # a half-made one from an interrupted run
        try:
            subprocess.run([base, "-m", "venv", str(env_dir)], check=True, capture_output=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"triton=={SIDE_TRITON}"],
                check=True,
                capture_output=True,
                text=True,
                timeout=900,
            )
            own = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(env_dir, ignore_errors=True)
            pytest.skip(f"cannot install triton=={SIDE_TRITON} in a side environment: {str(e.stderr or e)[-500:]}")
        ready.write_text(own)
    env["PYTHONPATH"] = os.pathsep.join([ready.read_text(), *ours])
    env["ATTNSCOPE_SIDE_PYTHON"] = str(python)
    out = subprocess.run(
        [str(python), "-c", "import torch, triton; print(triton.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == SIDE_TRITON, out.stdout + out.stderr[-2000:]
    return env


@pytest.mark.parametrize("arch, names", SIDE, ids=[f"sm{a}-{i}" for i, (a, _) in enumerate(SIDE)])
def test_kernels_compile_with_gpu_image_triton(arch, names):
    env = _side_env()
    rows = _compile(env["ATTNSCOPE_SIDE_PYTHON"], arch, names, env)
    assert {r["triton"] for r in rows} == {SIDE_TRITON}


def test_interpreter_of_gpu_image_triton_runs_or_refuses_in_one_line(tmp_path):
    # triton 3.6's interpreter turns loop bounds into one-element arrays, which numpy >= 2.4 refuses as an index:
    # the kernels then stop with one clear line instead of an interpreter traceback
    script = tmp_path / "probe.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('k', {str(SCRIPT.parent / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(SCRIPT.parent)!r}])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['k'] = mod; spec.loader.exec_module(mod)\n"
        "import torch\n"
        "from k import KeyRanges, AttnStatsSpec\n"
        "from k.qk_stats import qk_stats\n"
        "q = torch.randn(1, 2, 20, 16)\n"
        "try:\n"
        "    qk_stats(q, q[:, :1], 0.25, KeyRanges.full(1, 20), AttnStatsSpec(bins=32, thumb_size=4), 16, 16)\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e); sys.exit(3)\n"
        "print('ran')\n"
    )
    env = dict(_side_env(), TRITON_INTERPRET="1")
    proc = subprocess.run(
        [env["ATTNSCOPE_SIDE_PYTHON"], str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    import numpy as np

    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
        line = proc.stdout.strip()
        assert "\n" not in line and "numpy < 2.4" in line and f"triton {SIDE_TRITON}" in line, line
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stdout + proc.stderr[-3000:]
