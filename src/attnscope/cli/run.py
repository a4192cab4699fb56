"""``attnscope merge`` (join runs made separately) and ``attnscope sql`` (DuckDB over a run's Parquet files)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ._common import CLIError

__all__ = ["cmd_merge", "cmd_sql", "register", "sql_connection"]

VIEWS = {
    "heads": "one row per (layer, head): the mean of every attention vector over all tokens, and mean distance",
    "prompts": "one row per (prompt, layer, head): the prompt's mean of every vector, distance, sha256, preview",
    "tokens": "one row per token: prompt, position, token_id, token, logit_entropy, in_norm[], out_norm[], topk_*[]",
    "neurons": "one row per (layer, neuron) of down_proj: max, argmax_token (its token's position in the run: "
    "prompt_index.token_offset + position), mean, std over all tokens",
    "prompt_index": "one row per prompt: prompt, prompt_id, sha256, n_tokens, token_offset, preview",
    "logit_lens": "one row per (token, layer) of a --logit-lens run: top_id, top_token, top_prob, entropy, "
    "target_prob, target_rank, final_prob",
    "rules": "one row per (layer, neuron, context) written by `attnscope rules`: activation, trigger text and token, "
    "promoted tokens and their logits",
}


def cmd_merge(args) -> int:
    from attnscope.profiler.store import is_run, merge_runs

    for r in args.runs:
        if not is_run(r):
            raise CLIError(f"{r} is not a run directory (no run.json of attnscope)")
    out, dropped = merge_runs(args.runs, args.out, force=args.force)
    if dropped:
        print(
            f"attnscope: note: the merged run keeps no vectors tier (per-token vectors, per-prompt thumbnails): "
            f"only {', '.join(dropped)} had it (--keep vectors on every run keeps it)",
            file=sys.stderr,
        )
    from attnscope.profiler.store import _read_manifest

    doc = _read_manifest(Path(out))
    print(f"attnscope: merged {len(args.runs)} runs: {doc['n_prompts']} prompts, {doc['n_tokens']} tokens -> {out}")
    return 0


def sql_connection(run: str | Path):
    """A DuckDB connection with the run's views (``VIEWS``) over its Parquet files, read in place."""
    try:
        import duckdb
    except ImportError:
        raise CLIError("attnscope sql needs duckdb: pip install duckdb") from None
    from attnscope.profiler.store import is_run, run_tables

    if not is_run(run):
        raise CLIError(f"{run} is not a run directory (no run.json of attnscope)")
    t = run_tables(run)
    con = duckdb.connect()

    def files(part: str) -> str:
        return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in t[part]) + "]"

    if t["index"]:
        con.execute(  # token_offset: where the prompt's tokens start in the run (shards do not store it)
            "create view prompt_index as select prompt, prompt_id, sha256, n_tokens, "
            "sum(n_tokens) over (order by prompt) - n_tokens as token_offset, preview "
            f"from read_parquet({files('index')}, union_by_name = true)"
        )
        con.execute(f"create view prompts_raw as select * from read_parquet({files('prompts')})")
        con.execute(
            "create view prompts as select p.*, i.sha256, i.preview from prompts_raw p "
            "join prompt_index i using (prompt)"
        )
        con.execute(f"create view tokens as select * from read_parquet({files('tokens')})")
        if "lens_top_prob" in [d[0] for d in con.execute("select * from tokens limit 0").description]:
            fields = ("top_id", "top_token", "top_prob", "entropy", "target_prob", "target_rank", "final_prob")
            lists = ", ".join(f"unnest(lens_{f}) as {f}" for f in fields)
            con.execute(
                "create view logit_lens as select prompt, position, token_id, token, "
                f"unnest(range(len(lens_top_prob))) as layer, {lists} from tokens"
            )
    rules = Path(run) / "rules.parquet"
    if rules.is_file():
        con.execute(f"create view rules as select * from read_parquet('{_quote(rules)}')")
    con.register("heads", _heads_with_roles(run, t["heads"]))
    if t["neurons"] is not None:
        con.register("neurons", t["neurons"])
    return con


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def _heads_with_roles(run, heads):
    """The heads table with the head-role scores and label of ``attnscope.render.roles`` added."""
    from attnscope.profiler.data import load
    from attnscope.render.roles import head_roles

    if heads.num_rows == 0 or "entropy" not in heads.column_names:
        return heads
    r = head_roles(load(run))
    for name in ("local", "broad", "role"):
        heads = heads.append_column(name, [r[name].reshape(-1).tolist()])
    return heads


def cmd_sql(args) -> int:
    import duckdb

    con = sql_connection(args.run)
    try:
        res = con.execute(args.query)
        cols = [d[0] for d in res.description] if res.description else []
        rows = res.fetchall() if cols else []
    except duckdb.Error as e:
        msg = str(e).strip().splitlines()[0]
        names = {r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()}
        have = [v for v in VIEWS if v in names]  # this run's views (logit_lens and rules only where written)
        raise CLIError(f"sql: {msg} (views of this run: {', '.join(have) or 'none yet'})") from None
    out = sys.stdout
    if args.csv:
        w = csv.writer(out)
        w.writerow(cols)
        w.writerows(rows)
    elif args.json:
        json.dump([dict(zip(cols, r)) for r in rows], out, default=str)
        out.write("\n")
    else:
        cells = [[_fmt(v) for v in r] for r in rows]
        width = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
        out.write("  ".join(c.rjust(w) for c, w in zip(cols, width)) + "\n")
        for r in cells:
            out.write("  ".join(v.rjust(w) for v, w in zip(r, width)) + "\n")
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def register(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="join runs made separately (same model and settings) into one run",
        description="Join run directories of the same model and settings into a new run at --out, equal to one run "
        "of all their prompts (shards copied and renumbered, accumulators summed).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, in order")
    p.add_argument("--out", required=True, metavar="DIR", help="the new run directory")
    p.add_argument("--force", action="store_true", help="replace the run in --out (never a directory that is not one)")
    p.set_defaults(func=cmd_merge)

    s = sub.add_parser(
        "sql",
        help="query a run with SQL (DuckDB over its Parquet files, in place)",
        description="Run one SQL query on a run directory. Views: "
        + "; ".join(f"{k}: {v}" for k, v in VIEWS.items())
        + '. Example: attnscope sql runs/c "select layer, head, avg(sink) from heads group by 1, 2 order by 3 desc"',
    )
    s.add_argument("run", metavar="RUN", help="a run directory")
    s.add_argument("query", help="the SQL query")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout")
    fmt.add_argument("--json", action="store_true", help="a JSON array of row objects on stdout")
    s.set_defaults(func=cmd_sql)
