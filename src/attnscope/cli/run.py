"""``attnscope merge`` (join runs made separately) and ``attnscope sql`` (DuckDB over a run's Parquet files)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ._common import USER_ERRORS, CLIError

__all__ = ["cmd_merge", "cmd_sql", "read_only_statement", "register", "sql_connection"]

VIEWS = {
    "heads": "one row per (layer, head): the mean of every attention vector over all tokens, and mean distance",
    "prompts": "one row per (prompt, layer, head): the prompt's mean of every vector, distance, sha256, preview",
    "tokens": "one row per token: prompt, position, token_id, token, logit_entropy, in_norm[], out_norm[], topk_*[]",
    "neurons": "one row per (layer, neuron) of down_proj: max, argmax_token (its token's position in the run: "
    "prompt_index.token_offset + position), mean, std over all tokens",
    "experts": "one row per (MoE layer, expert): tokens routed to it, share of the layer's routings, weight_sum, "
    "mean_weight (tokens' experts[] and expert_weights[] hold each token's routing)",
    "expert_neurons": "one row per (MoE layer, expert, neuron): tokens routed to the expert, and the neuron's max, "
    "argmax_token, mean, std over them (NULL: no token)",
    "prompt_index": "one row per prompt: prompt, prompt_id, sha256, n_tokens, token_offset, preview, spans (its named "
    "spans in tokens, JSON)",
    "span_attention": "one row per (prompt, layer, head, query span, key span) of prompts with named spans: mass (mean "
    "over the query span's rows of their weight on the key span), top1 (share of those rows whose largest weight "
    "lies in the key span); query spans: every named span and `last` (the final token's row)",
    "key_scores": "one row per (prompt, layer, head, key position) of a run with the vectors tier: snapkv (the "
    "attention the prompt's last 32 rows give the key: SnapKV's observation-window score), h2o (the attention all "
    "rows give it: H2O's accumulated score); built from the vectors when a query names it",
    "logit_lens": "one row per (token, layer) of a --logit-lens run: top_id, top_token, top_prob, entropy, "
    "target_prob, target_rank, final_prob",
    "suite": "one row per prompt of an `attnscope suite` run: prompt_id, suite, its settings (length, depth; task, "
    "dataset, ...), generated (the model's greedy answer), gold, correct; join span_attention and prompts by prompt_id",
    "rules": "one row per (layer, expert, neuron, context) written by `attnscope rules` (expert -1: a dense layer): "
    "activation, trigger text and token, "
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
    from attnscope.profiler.store import read_manifest

    doc = read_manifest(Path(out))
    print(f"attnscope: merged {len(args.runs)} runs: {doc['n_prompts']} prompts, {doc['n_tokens']} tokens -> {out}")
    return 0


# Statements that only read: SELECT covers WITH, VALUES, FROM-first, DESCRIBE, SHOW, SUMMARIZE and PIVOT ... IN (...)
_READ_ONLY = {"SELECT"}
_EXPORT_HINT = "sql only reads; to save a result give --out FILE (.csv, .parquet or .json)"


def sql_connection(run: str | Path, spill_dir: str | Path | None = None, key_scores: bool = False):
    """A DuckDB connection with the run's views (``VIEWS``) over its Parquet files, read in place, confined to them.

    Before it is returned the connection can open no file but the run's verified table files (and its
    ``rules.parquet``): external access is off (no COPY, ATTACH, read_csv/read_text/read_blob/glob of other files),
    extensions are neither installed nor loaded, Python variables are not scanned, and the configuration is locked.
    ``spill_dir``: where DuckDB may spill a large sort or join (outside the run; default: no spilling).
    ``key_scores``: also the ``key_scores`` view, built in memory from the run's vectors (``store.run_tables``)."""
    import duckdb

    from attnscope.kernels.stats import SPAN_FIELDS
    from attnscope.profiler.columns import LENS_COLUMNS, lens_fields
    from attnscope.profiler.store import is_run, run_tables

    if not is_run(run):
        raise CLIError(f"{run} is not a run directory (no run.json of attnscope)")
    t = run_tables(run, key_scores=key_scores)  # a run without the vectors: ProfileError, one line
    for part in ("index", "prompts", "tokens", "spans"):
        t[part] = [os.path.abspath(f) for f in t[part]]
    rules = Path(os.path.abspath(Path(run) / "rules.parquet"))
    has_rules = rules.is_file() and not rules.is_symlink()
    suite = Path(os.path.abspath(Path(run) / "suite.parquet"))  # written by `attnscope suite`
    has_suite = suite.is_file() and not suite.is_symlink()
    allowed = [f for part in ("index", "prompts", "tokens", "spans") for f in t[part]]
    allowed += [str(rules)] if has_rules else []
    allowed += [str(suite)] if has_suite else []
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "python_enable_replacements": False,
            "temp_directory": str(spill_dir) if spill_dir else "",
        }
    )
    con.execute("set allowed_paths = ?", [allowed])  # these files only: none of the run's others, nothing outside
    con.execute("set enable_external_access = false")

    def files(part: str) -> str:
        return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in t[part]) + "]"

    if t["index"]:
        index = f"read_parquet({files('index')}, union_by_name = true)"
        has_spans = "spans" in [d[0] for d in con.execute(f"select * from {index} limit 0").description]
        con.execute(  # token_offset: where the prompt's tokens start in the run (shards do not store it)
            "create view prompt_index as select prompt, prompt_id, sha256, n_tokens, "
            "sum(n_tokens) over (order by prompt) - n_tokens as token_offset, preview, "
            f"{'spans' if has_spans else 'NULL::VARCHAR'} as spans from {index}"
        )
        con.execute(f"create view prompts_raw as select * from read_parquet({files('prompts')})")
        con.execute(
            "create view prompts as select p.*, i.sha256, i.preview from prompts_raw p "
            "join prompt_index i using (prompt)"
        )
        con.execute(f"create view tokens as select * from read_parquet({files('tokens')})")
        first = LENS_COLUMNS[0].column  # a --logit-lens run's tables have the lens columns
        if first in [d[0] for d in con.execute("select * from tokens limit 0").description]:
            lists = ", ".join(f"unnest({c.column}) as {f}" for c, f in zip(LENS_COLUMNS, lens_fields()))
            con.execute(
                "create view logit_lens as select prompt, position, token_id, token, "
                f"unnest(range(len({first}))) as layer, {lists} from tokens"
            )
    if t["spans"]:
        con.execute(f"create view span_attention as select * from read_parquet({files('spans')})")
    else:  # no prompt named spans: the view exists, empty
        con.execute(
            "create view span_attention as select * from (values (0::BIGINT, ''::VARCHAR, 0::INTEGER, 0::INTEGER, "
            "''::VARCHAR, ''::VARCHAR, 0::FLOAT, 0::FLOAT)) t(prompt, prompt_id, layer, head, query_span, key_span, "
            f"{', '.join(SPAN_FIELDS)}) where false"
        )
    if has_suite:
        con.execute(f"create view suite as select * from read_parquet('{_quote(suite)}')")
    if has_rules:
        con.execute(f"create view rules as select * from read_parquet('{_quote(rules)}')")
    con.register("heads", _heads_with_roles(run, t["heads"]))
    if t["key_scores"] is not None:
        con.register("key_scores", t["key_scores"])
    if t["neurons"] is not None:
        con.register("neurons", t["neurons"])
    for view in ("experts", "expert_neurons"):
        if t.get(view) is not None:
            con.register(view, t[view])
    con.execute("set lock_configuration = true")
    return con


def read_only_statement(con, query: str):
    """The one statement of ``query`` if it only reads (SELECT and its forms, EXPLAIN of one), else ``CLIError``.

    Several statements are refused, even if each would be allowed: ``sql`` answers one query."""
    import duckdb

    try:
        stmts = con.extract_statements(query)
    except duckdb.Error as e:
        raise CLIError(f"sql: {str(e).strip().splitlines()[0]}") from None
    except ValueError:  # a statement kind this duckdb's Python API cannot name (e.g. UPDATE EXTENSIONS)
        raise CLIError(f"sql: this kind of statement is refused: {_EXPORT_HINT}") from None
    if not stmts:
        raise CLIError('sql: the query is empty (give one statement, e.g. "select * from heads limit 5")')
    if len(stmts) > 1:
        raise CLIError(f"sql: give one statement, not {len(stmts)} (sql answers one query at a time)")
    st = stmts[0]
    kind = st.type.name
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs the statement it explains: that one must read only too
        m = re.match(r"explain(\s+analy[sz]e)?\b(.*)", _strip_comments(st.query), re.I | re.S)
        try:
            inner = con.extract_statements(m.group(2)) if m else []
        except (duckdb.Error, ValueError):
            inner = []
        if len(inner) == 1 and inner[0].type.name in _READ_ONLY:
            return st
        raise CLIError(f"sql: EXPLAIN is allowed of a SELECT only: {_EXPORT_HINT}")
    if kind == "MULTI":
        raise CLIError("sql: PIVOT without an IN list is refused (it creates types); write select * from (pivot ...)")
    if kind not in _READ_ONLY:
        raise CLIError(f"sql: {kind} statements are refused: {_EXPORT_HINT}")
    return st


def _strip_comments(sql: str) -> str:
    """``sql`` without its leading whitespace and comments (``-- ...`` and ``/* ... */``)."""
    while True:
        s = sql.lstrip()
        if s.startswith("--"):
            s = s.split("\n", 1)[1] if "\n" in s else ""
        elif s.startswith("/*"):
            s = s.split("*/", 1)[1] if "*/" in s else ""
        if s == sql:
            return s
        sql = s


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def _heads_with_roles(run, heads):
    """The heads table with the head-role scores and label of ``attnscope.render.roles`` added."""
    from attnscope.profiler.store import load
    from attnscope.render.roles import head_roles

    if heads.num_rows == 0 or "entropy" not in heads.column_names:
        return heads
    r = head_roles(load(run))
    for name in ("local", "broad", "role"):
        heads = heads.append_column(name, [r[name].reshape(-1).tolist()])
    return heads


OUT_FORMATS = (".csv", ".parquet", ".json")


def _out_path(run: str | Path, out: str) -> Path:
    """``--out``: a file of a known format, in an existing folder, not inside the run (nor the run itself)."""
    path = Path(out)
    fmt = path.suffix.lower()
    if fmt not in OUT_FORMATS:
        raise CLIError(f"sql --out {out}: the format is chosen by the extension: {', '.join(OUT_FORMATS)}")
    full = path.resolve()  # follows links: a link that leads into the run is inside it
    root = Path(run).resolve()
    if full == root or full.is_relative_to(root):
        raise CLIError(f"sql --out {out} lies inside the run {run}: sql never writes into a run; choose another path")
    from attnscope.profiler.store import is_run

    for d in full.parents:  # nor inside any other run
        if is_run(d):
            raise CLIError(f"sql --out {out} lies inside the run {d}: sql never writes into a run; choose another path")
    if full.is_dir():
        raise CLIError(f"sql --out {out} is a directory: give a file name ending in {', '.join(OUT_FORMATS)}")
    if not full.parent.is_dir():
        raise CLIError(f"sql --out {out}: no folder {path.parent}")
    return path


def _write_out(con, query: str, path: Path) -> int:
    """Write the query's result to ``path`` atomically (a temporary file beside it, fsynced, then renamed over
    ``path``); returns the row count. Parquet goes through Arrow, CSV and JSON as on stdout."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            if path.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                reader = con.sql(query).to_arrow_reader(65536)
                n = 0
                with pq.ParquetWriter(raw, reader.schema) as w:
                    for batch in reader:
                        w.write_batch(batch)
                        n += batch.num_rows
            else:
                text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                n = _write_rows(con.execute(query), text, path.suffix.lower()[1:])
                text.flush()
                text.detach()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


def _write_rows(res, out, fmt: str) -> int:
    """Stream the result's rows to ``out`` as CSV or as a JSON array of row objects; returns the row count."""
    cols = [d[0] for d in res.description] if res.description else []
    w = csv.writer(out) if fmt == "csv" else None
    if w:
        w.writerow(cols)
    else:
        out.write("[")
    n = 0
    while rows := res.fetchmany(8192):
        if w:
            w.writerows(rows)
        else:
            out.write("".join(("" if n + i == 0 else ", ") + json.dumps(dict(zip(cols, r)), default=str)
                              for i, r in enumerate(rows)))  # fmt: skip
        n += len(rows)
    if not w:
        out.write("]\n")
    return n


def cmd_sql(args) -> int:
    import duckdb

    out_path = _out_path(args.run, args.out) if getattr(args, "out", None) else None
    spill = tempfile.mkdtemp(prefix="attnscope-sql-")  # DuckDB's spill files: never in the run, nor the cwd
    con = None
    try:
        named = re.search(r"\bkey_scores\b", args.query, re.IGNORECASE) is not None  # built only for a query naming it
        con = sql_connection(args.run, spill_dir=Path(spill) / "spill", key_scores=named)
        read_only_statement(con, args.query)  # one statement, and one that only reads: run as given
        try:
            if out_path is not None:
                n = _write_out(con, args.query, out_path)
                print(f"attnscope: wrote {n} rows -> {out_path}", file=sys.stderr)
            elif args.csv or args.json:
                _write_rows(con.execute(args.query), sys.stdout, "csv" if args.csv else "json")
            else:
                res = con.execute(args.query)
                cols = [d[0] for d in res.description] if res.description else []
                _write_table(res.fetchall() if cols else [], cols, sys.stdout)
        except MemoryError:
            raise CLIError(
                "sql: out of memory holding the result: add a LIMIT, aggregate, or write it with --out FILE.parquet"
            ) from None
        except duckdb.Error as e:
            msg = str(e).strip().splitlines()[0]
            names = {r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()}
            have = [v for v in VIEWS if v in names]  # this run's views (logit_lens and rules only where written)
            raise CLIError(f"sql: {msg} (views of this run: {', '.join(have) or 'none yet'})") from None
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return 0


def _write_table(rows: list[tuple], cols: list[str], out) -> None:
    cells = [[_fmt(v) for v in r] for r in rows]
    width = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    out.write("  ".join(c.rjust(w) for c, w in zip(cols, width)) + "\n")
    for r in cells:
        out.write("  ".join(v.rjust(w) for v, w in zip(r, width)) + "\n")


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
    p.set_defaults(func=cmd_merge, user_errors=USER_ERRORS)

    s = sub.add_parser(
        "sql",
        help="query a run with SQL (DuckDB over its Parquet files, in place, read-only)",
        description="Run one read-only SQL statement on a run directory: SELECT in any form (WITH, VALUES, FROM ..., "
        "DESCRIBE, SHOW, SUMMARIZE, PIVOT ... IN (...)) or EXPLAIN of one. DuckDB opens only the run's own table "
        "files: COPY, ATTACH, INSTALL/LOAD, SET, PRAGMA, CREATE/INSERT/UPDATE/DELETE, EXPORT and CALL are refused, "
        "and so are reads of any other file (read_csv, read_text, read_blob, glob). To save a result give --out FILE "
        "(never inside the run). Views: "
        + "; ".join(f"{k}: {v}" for k, v in VIEWS.items())
        + '. Example: attnscope sql runs/c "select layer, head, avg(sink) from heads group by 1, 2 order by 3 desc"',
    )
    s.add_argument("run", metavar="RUN", help="a run directory")
    s.add_argument("query", help="one SQL statement that only reads")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout")
    fmt.add_argument("--json", action="store_true", help="a JSON array of row objects on stdout")
    fmt.add_argument(
        "--out",
        metavar="FILE",
        help="write the result to FILE (.csv, .parquet or .json, by its extension; atomically; not inside the run)",
    )
    s.set_defaults(func=cmd_sql, user_errors=USER_ERRORS)
