"""A plain (non-editable) install imports from outside the repository and installs only `attnscope`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_imports_from_outside(tmp_path):
    target = tmp_path / "site"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    top = sorted(
        p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"
    )
    assert top == ["attnscope"], f"installed top-level names {top}: never install kernels/profiler/render"
    code = (
        "import sys, attnscope; assert 'torch' not in sys.modules;"
        "import attnscope.kernels, attnscope.profiler, attnscope.render, attnscope.cli;"
        "from attnscope.profiler.data import Profile; from attnscope.kernels.reference import attn_stats_ref;"
        # a top-level kernels may be the Hub's package (transformers >= 5.25 depends on it), never ours
        f"import importlib.util as u; s = u.find_spec('kernels'); assert s is None or not (s.origin or '').startswith("
        f"{str(target)!r}), 'attnscope installed a top-level kernels';"
        "print(attnscope.__file__)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith(str(target))


def _python_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter outside the checkout; it must exit 0."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]


def test_packages_import_no_optional_backends():
    # STYLE: importing a package must not import triton, numba or plotly (they load on first use)
    _python_ok(
        "import sys; import attnscope, attnscope.kernels, attnscope.profiler, attnscope.render; "
        "heavy = [m for m in ('triton', 'numba', 'plotly') if m in sys.modules]; assert not heavy, heavy"
    )


def test_render_package_does_not_import_torch():
    _python_ok(
        "import sys; import attnscope.render.kde, attnscope.render.laminar, attnscope.profiler.data; "
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, sorted(sys.modules)"
    )


def test_checkout_folders_are_not_top_level_modules():
    """In the test session (run from the repository root, which ``python -m pytest`` puts on sys.path) no
    kernels, profiler or render of the checkout is importable as a top-level name: transformers >= 5.25 would take a
    top-level ``kernels`` for the Hub's package of that name."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name in ("kernels", "profiler", "render"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        assert origin is None or root not in origin.parents, f"{name} resolves to the checkout's {origin}"
