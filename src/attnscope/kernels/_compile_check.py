"""Compile the Triton kernels for a CUDA target without a GPU, and report registers, spills and SASS size.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline (TTIR, TTGIR, LLVM IR, PTX, and ptxas from the triton wheel to a cubin) on any machine. Each kernel is
compiled at the configurations its launcher picks, so a compile error, a register spill or a bloated inner loop shows
up in CI long before a GPU runs it.

Run it as ``python src/attnscope/kernels/_compile_check.py --arch 90 [--only NAME] [--json]`` with
``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions). It loads this folder as a package by
its path, so any Python that has torch and triton can run it, e.g. a side environment holding another triton version.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["CONFIGS", "compile_config", "sass_counts"]

_DT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _kernels_pkg():
    """This folder as a package: ``attnscope.kernels`` when importable from here, else loaded by its path."""
    if __package__:
        return importlib.import_module(__package__)
    here = Path(__file__).resolve().parent
    name = "_attnscope_kernels_by_path"
    if name not in sys.modules:
        init = here / "__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(here)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _spec(fn, pointers: dict, floats: tuple, constexprs: dict, options: dict):
    """ASTSource arguments: pointers aligned to 16 bytes (as torch allocates them), other scalars int32."""
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = "*" + pointers[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "fp32" if n in floats else "i32"
    return fn, sig, constexprs, attrs, options


def _qk_stats(
    head_dim: int,
    dtype: str,
    seq_len: int,
    lse: bool = False,
    kind: int = 0,
    softcap: bool = False,
    sinks: bool = False,
    **override,
):
    """The attention-statistics kernel as its launcher configures it for this shape (``override``: other tiles;
    ``kind``: 0 causal, 1 sliding window, 2 chunked)."""
    pkg = _kernels_pkg()
    qk = importlib.import_module(pkg.__name__ + ".qk_stats")
    st = importlib.import_module(pkg.__name__ + "._settings")
    dt = _DT[dtype]
    cfg = st.qk_stats_settings(head_dim, seq_len, 4096, 64, dtype=dtype)
    cfg.update(override)
    pointers = dict(HIST_ALL="i32", HIST_LOG="i32", MOM="fp64", DIST="fp64", THUMB="fp32", VEC="fp32")
    pointers.update(Q=dt, K=dt, LSE="fp32")
    pointers.update(START="i64", END="i64", CELL="i32", TOK="i64", TOKB="i64", SINKS="fp32")
    constexprs = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    constexprs.update(HEAD_DIM=head_dim, NB=4096, IEEE=dt == "fp32", UPCAST=False, HAS_LSE=lse)
    constexprs.update(KIND=kind, SOFTCAP=softcap, HAS_SINKS=sinks)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    floats = ("qk_scale", "cap_in", "cap_out", "log_min")
    return _spec(qk._qk_stats_fused_kernel, pointers, floats, constexprs, options)


def _down_proj(d_ff: int, d_model: int, dtype: str, top_k: int = 8):
    """The down_proj statistics kernel as its launcher configures it."""
    pkg = _kernels_pkg()
    dp = importlib.import_module(pkg.__name__ + ".down_proj")
    st = importlib.import_module(pkg.__name__ + "._settings")
    dt = _DT[dtype]
    cfg = st.down_proj_settings(d_ff, d_model, top_k)
    pointers = {n: "fp32" for n in ("IN_SQ", "OUT_SQ", "CAND_VAL", "P_MAX", "P_SUM", "P_SQ")}
    pointers.update(CAND_IDX="i32", P_ARG="i64", X=dt, Y=dt)
    warps = cfg.pop("num_warps")
    constexprs = dict(cfg, K=top_k)
    return _spec(dp._down_proj_act_norm_kernel, pointers, (), constexprs, {"num_warps": warps, "num_stages": 2})


def _vocab(dtype: str, softcap: bool = False, bias: bool = True):
    """The logit-lens vocabulary kernel with its launcher's default tiles."""
    pkg = _kernels_pkg()
    vs = importlib.import_module(pkg.__name__ + ".vocab_stats")
    dt = _DT[dtype]
    pointers = {n: "fp32" for n in ("M", "ZS", "A", "BEST", "ZT")}
    pointers.update(BEST_ID="i64", ABOVE="i32", H=dt, W=dt, BIAS=dt, TARGET="i64")
    d = {k: p.default for k, p in inspect.signature(vs.vocab_stats_triton).parameters.items()}
    tiles = dict(BLOCK_T=d["block_t"], BLOCK_V=d["block_v"], BLOCK_D=d["block_d"])
    constexprs = dict(HAS_BIAS=bias, SOFTCAP=softcap, IEEE=dt == "fp32", UPCAST=False, **tiles)
    options = {"num_warps": d["num_warps"]}
    return _spec(vs._vocab_stats_online_kernel, pointers, ("cap_in", "cap_out"), constexprs, options)


# name -> (builder, kwargs): the launchers' own configurations at the shapes that matter (Pythia-2.8B: d_head 80,
# bf16; Llama-style d_head 64 and 128; the fp32 path of the tests). The length is a runtime argument of the kernels:
# one compile serves every length.
CONFIGS = {
    "qk_stats_d80_bf16": (_qk_stats, dict(head_dim=80, dtype="bfloat16", seq_len=2048)),
    "qk_stats_d128_bf16": (_qk_stats, dict(head_dim=128, dtype="bfloat16", seq_len=2048)),
    "qk_stats_d64_fp16": (_qk_stats, dict(head_dim=64, dtype="float16", seq_len=2048)),
    "qk_stats_d64_fp32": (_qk_stats, dict(head_dim=64, dtype="float32", seq_len=2048)),
    "qk_stats_d128_fp32": (_qk_stats, dict(head_dim=128, dtype="float32", seq_len=2048)),
    "qk_stats_lse_d80_bf16": (_qk_stats, dict(head_dim=80, dtype="bfloat16", seq_len=2048, lse=True)),
    "qk_stats_lse_d128_bf16": (_qk_stats, dict(head_dim=128, dtype="bfloat16", seq_len=2048, lse=True)),
    # the attention other architectures define: Gemma-2 (d_head 256, softcapping, sliding layers), Gemma-3 (256),
    # DeepSeek-V3's MLA (q/k head size 192), gpt-oss (learned sinks, sliding layers), Llama-4 (chunked layers)
    "qk_stats_softcap_sliding_d256_bf16": (
        _qk_stats,
        dict(head_dim=256, dtype="bfloat16", seq_len=2048, kind=1, softcap=True),
    ),
    "qk_stats_d256_bf16": (_qk_stats, dict(head_dim=256, dtype="bfloat16", seq_len=2048)),
    "qk_stats_d192_bf16": (_qk_stats, dict(head_dim=192, dtype="bfloat16", seq_len=2048)),
    "qk_stats_sinks_sliding_d64_bf16": (
        _qk_stats,
        dict(head_dim=64, dtype="bfloat16", seq_len=2048, kind=1, sinks=True),
    ),
    "qk_stats_chunked_d128_bf16": (_qk_stats, dict(head_dim=128, dtype="bfloat16", seq_len=2048, kind=2)),
    "vocab_stats_bf16": (_vocab, dict(dtype="bfloat16")),
    "vocab_stats_softcap_bf16": (_vocab, dict(dtype="bfloat16", softcap=True)),  # Gemma-2's final softcapping
    "down_proj_pythia_bf16": (_down_proj, dict(d_ff=10240, d_model=2560, dtype="bfloat16")),
    "down_proj_smollm2_fp32": (_down_proj, dict(d_ff=1536, d_model=576, dtype="float32")),
}


def _tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def sass_counts(cubin: bytes) -> dict:
    """SASS instruction count of the kernel and of its largest loop (the span of its longest backward branch)."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    addr, target = [], []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not m:
            continue
        a = int(m.group(1), 16)
        addr.append(a)
        t = re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", m.group(2))
        if t and int(t.group(1), 16) < a:
            target.append((int(t.group(1), 16), a))
    total = len(addr)
    loop = max(((hi - lo) // 16 + 1 for lo, hi in target), default=0)  # 16 bytes an instruction
    return {"sass": total, "sass_loop": loop}


def _ptxas_info(log: str) -> dict:
    """Registers and spill bytes from ``ptxas -v``."""
    out = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"(\d+) bytes stack frame", log)
    if m:
        out["stack"] = int(m.group(1))
    return out


def compile_config(name: str, arch: int) -> dict:
    """Compile one configuration of ``CONFIGS`` for sm_<arch>; returns the numbers (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget

    build, kw = CONFIGS[name]
    fn, signature, constexprs, attrs, options = build(**kw)
    triton.knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - t0
    res = {"name": name, "arch": arch, "triton": triton.__version__, "compile_s": round(seconds, 2)}
    res.update({k: v for k, v in options.items()})
    res.update({k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("NB", "HAS_LSE", "KIND")})
    res.update(_ptxas_info(buf.getvalue()))
    res["shared"] = compiled.metadata.shared
    res.update(sass_counts(compiled.asm["cubin"]))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 or 80 (repeatable)")
    ap.add_argument("--only", action="append", help="configuration names (repeatable; default: all)")
    ap.add_argument("--json", action="store_true", help="one JSON object a line")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the kernels it would compile")
    # a fresh cache, so that every configuration is really compiled and ptxas reports on it
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnscope-compile-")
    failed = 0
    for arch in args.arch or [90]:
        for name in args.only or list(CONFIGS):
            try:
                res = compile_config(name, arch)
            except Exception as e:  # report every configuration, fail at the end
                failed += 1
                res = {"name": name, "arch": arch, "error": f"{type(e).__name__}: {e}"[:4000]}
            if args.json:
                print(json.dumps(res), flush=True)
            else:
                print(" ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
