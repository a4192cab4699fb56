"""The interpretation commands: ``heads`` (the head-role table and map)."""

from __future__ import annotations

from pathlib import Path

from ._common import CLIError, load_profile

__all__ = ["register"]


def cmd_heads(args) -> int:
    import numpy as np

    from attnscope.render.export import write_table
    from attnscope.render.roles import ROLE_THRESHOLDS, head_roles, plot_head_roles
    from attnscope.render.views import save

    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    prof = load_profile(args.profile)
    r = head_roles(prof)
    Ly, H = prof.n_layers, prof.n_heads
    table = {"layer": np.repeat(np.arange(Ly), H), "head": np.tile(np.arange(H), Ly)}
    table.update({name: np.asarray(v).reshape(-1) for name, v in r.items()})
    out = Path(args.out) if args.out else Path(args.profile) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    print(write_table(table, out / "head_roles", "parquet" if args.parquet else "csv"))
    print(save(plot_head_roles(prof), out / f"head_roles.{args.format}"))
    for role, (col, thr) in ROLE_THRESHOLDS.items():
        order = np.argsort(-table[col], kind="stable")[: args.top]
        best = ", ".join(f"{table['layer'][i]}:{table['head'][i]} {table[col][i]:.2f}" for i in order)
        n = int((table["role"] == role).sum())
        print(f"{role:>15} ({col} >= {thr}): {n:3d} heads; highest {best}")
    return 0


def register(sub) -> None:
    v = sub.add_parser(
        "heads",
        help="the head-role table (sink, previous-token, induction, duplicate, self, local, broad) and its map",
        description="Score every head by role from a saved profile alone, write the table (CSV or Parquet) and a "
        "layers x heads figure, and print the highest-scoring heads of each role. Scores are means over all "
        "query tokens; the thresholds are in attnscope.render.roles.",
    )
    v.add_argument("profile", help="a profile directory written by `attnscope profile`")
    v.add_argument(
        "--out", metavar="DIR", help="where to write head_roles.csv and head_roles.png (default: PROFILE/figures)"
    )
    v.add_argument("--top", type=int, default=3, help="heads listed per role (default: 3)")
    v.add_argument("--parquet", action="store_true", help="write the table as Parquet (needs pyarrow) instead of CSV")
    v.add_argument("--format", default="png", choices=["png", "pdf"], help="image format (default: png)")
    v.set_defaults(func=cmd_heads)
