"""Export the per-token and per-head tables as CSV or Parquet files other tools can read."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .summary import head_summary, token_table

__all__ = ["export_tables", "head_table", "write_table"]


def head_table(prof) -> dict[str, np.ndarray]:
    """One row per (layer, head): the summary statistics of ``summary.head_summary``."""
    s = head_summary(prof)
    Ly, H = prof.n_layers, prof.n_heads
    out = {"layer": np.repeat(np.arange(Ly), H), "head": np.tile(np.arange(H), Ly)}
    out.update({name: v.reshape(-1) for name, v in s.items()})
    return out


def write_table(table: dict[str, np.ndarray], path: Path, fmt: str) -> Path:
    """Write columns of equal length to ``path`` + ``.csv`` or ``.parquet``; returns the file written."""
    if fmt == "csv":
        path = path.with_suffix(".csv")
        cols = list(table)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for row in zip(*(table[c].tolist() for c in cols)):
                w.writerow(row)
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = path.with_suffix(".parquet")
    pq.write_table(pa.table({c: v.tolist() if v.dtype == object else v for c, v in table.items()}), path)
    return path


def export_tables(prof, out_dir, fmt: str = "csv") -> list[Path]:
    """Write ``tokens.<fmt>`` (one row per token) and ``heads.<fmt>`` (one row per layer and head)."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format must be csv or parquet, got {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_table(token_table(prof), out_dir / "tokens", fmt),
        write_table(head_table(prof), out_dir / "heads", fmt),
    ]
