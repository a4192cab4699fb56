"""The shape of the code, checked: module sizes, imports that go one way, and statistics declared once.

The layers are kernels <- profiler <- render <- cli (each imports only the layers before it); no module imports
another module's private names (three at most); a statistic's name is spelled in at most two source files
(``kernels/stats.py`` declares it, everything else reads the declaration). See docs/design.md.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"kernels": 0, "profiler": 1, "render": 2, "cli": 3}
MAX_LINES = 600
MAX_PRIVATE_IMPORTS = 3
MAX_FILES_PER_NAME = 2


def _modules() -> dict[str, Path]:
    """Every source module of the package, by its dotted name (from pyproject's package-dir)."""
    line = re.search(r"^package-dir = \{(.*)\}$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    dirs = dict(re.findall(r'"([\w.]+)" = "([\w/]+)"', line))
    mods: dict[str, Path] = {}
    for pkg, d in dirs.items():
        for f in (ROOT / d).rglob("*.py"):
            parts = list(f.relative_to(ROOT / d).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


MODULES = _modules()
TREES = {m: ast.parse(f.read_text(), str(f)) for m, f in MODULES.items()}


def _target(mod: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = mod.split(".")
    if MODULES[mod].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Edges module -> imported module (function-level imports too), and the private names imported across."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for m, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                tgt = _target(m, node)
                if not tgt or not tgt.startswith("attnscope"):
                    continue
                for a in node.names:
                    sub = f"{tgt}.{a.name}"
                    if sub in MODULES:
                        edges[m].add(sub)
                        continue
                    edges[m].add(tgt)
                    if a.name.startswith("_") and not a.name.startswith("__") and tgt != m:
                        private.append((m, tgt, a.name))
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in MODULES)
    return edges, private


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_source_module_is_too_long():
    long = {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle():
    edges, _ = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_one_way():
    edges, _ = _imports()
    up = [
        (m, t)
        for m, ts in edges.items()
        for t in ts
        if t in MODULES and _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)
    ]
    assert not up, f"imports from a later layer (kernels <- profiler <- render <- cli): {up}"


def test_private_names_stay_in_their_module():
    _, private = _imports()
    assert len(private) <= MAX_PRIVATE_IMPORTS, f"private names imported from other modules: {private}"


def _literals(tree: ast.AST) -> list[str]:
    """The string constants of a module, its docstrings left out."""
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docs.add(id(body[0].value))
    consts = (n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    return [n.value for n in consts if id(n) not in docs]


def test_statistic_names_are_spelled_in_at_most_two_files():
    from attnscope.kernels import stats
    from attnscope.profiler.columns import lens_fields

    # "entropy" also names the next-token distribution's entropy (vocab_stats, the logit lens): another statistic
    names = ({s.name for s in stats.VECTORS} | {s.name for s in stats.LAYER_STATS}) - set(lens_fields())
    keys = {s.key for s in (*stats.VECTORS, *stats.LAYER_STATS)} | set(stats.ACCUM_KEYS)
    where = defaultdict(set)
    for m, tree in TREES.items():
        for v in _literals(tree):
            if v in names or v in keys:
                where[v].add(m)
    spread = {v: sorted(ms) for v, ms in where.items() if len(ms) > MAX_FILES_PER_NAME}
    assert not spread, f"statistic names spelled in more than {MAX_FILES_PER_NAME} source files: {spread}"
    files = set().union(*where.values()) if where else set()
    assert len(files) <= MAX_FILES_PER_NAME, f"the statistic names are spelled in {sorted(files)}"


@pytest.mark.parametrize("stat_kind", ["VECTORS", "ACCUMULATORS"])
def test_declarations_are_complete(stat_kind):
    # every declared statistic has what the store, the SQL views and the renderers read from it
    from attnscope.kernels import stats

    for s in getattr(stats, stat_kind):
        if stat_kind == "VECTORS":
            assert s.kind == "vector" and s.axis in ("query", "key") and s.fold in ("store", "sum", "max")
            assert s.label and s.formula and s.slot == stats.VECTORS.index(s)
        else:
            assert s.fold in ("sum", "max", "topk", "companion") and s.shape and s.dtype
            assert s.companion is None or s.companion in stats.ACCUM_KEYS
