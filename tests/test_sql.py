"""attnscope merge equals one run of both corpora; attnscope sql answers known queries over the Parquet files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from helpers import profile_corpus, random_text

from attnscope.cli import main
from attnscope.profiler import load
from attnscope.profiler.data import ACCUM_NAMES, ATTN_VECTORS


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def _profile(model_dir, corpus, out, *extra):
    assert profile_corpus(model_dir, corpus, out, *extra) == 0


@pytest.mark.parametrize("keep", ["tables", "vectors"])
def test_merge_equals_one_run_of_both(model_dir, tmp_path, rng, keep):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ta = [random_text(int(k), rng) for k in rng.integers(2, 20, size=4)]
    tb = [random_text(int(k), rng) for k in rng.integers(2, 20, size=5)]
    a.write_text("".join(json.dumps({"id": f"a{i}", "text": t}) + "\n" for i, t in enumerate(ta)))
    b.write_text("".join(json.dumps({"id": f"b{i}", "text": t}) + "\n" for i, t in enumerate(tb)))
    (tmp_path / "ab.jsonl").write_text(a.read_text() + b.read_text())
    _profile(model_dir, a, tmp_path / "ra", "--keep", keep)
    _profile(model_dir, b, tmp_path / "rb", "--keep", keep)
    _profile(model_dir, tmp_path / "ab.jsonl", tmp_path / "rab", "--keep", keep)
    assert main(["merge", str(tmp_path / "ra"), str(tmp_path / "rb"), "--out", str(tmp_path / "m")]) == 0
    m, one = load(tmp_path / "m"), load(tmp_path / "rab")
    assert list(m.prompts) == list(one.prompts)
    assert sorted(m.arrays) == sorted(one.arrays)
    for name in m.arrays:
        x, y = m.arrays[name], one.arrays[name]
        if name in ACCUM_NAMES and x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12, err_msg=name)  # sums grouped otherwise
        else:
            assert np.array_equal(x, y), name
    # merging into an existing run needs --force; a non-run input is refused in one line
    assert main(["merge", str(tmp_path / "ra"), "--out", str(tmp_path / "m")]) == 2
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m2")]) == 2


def test_merge_of_runs_that_kept_different_tiers(model_dir, tmp_path, rng, capsys):
    """--keep auto keeps vectors for small runs only: a merge keeps the tier all its runs share, and says so."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(2, 12, size=3)) + "\n")
    b.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(2, 12, size=2)) + "\n")
    _profile(model_dir, a, tmp_path / "ra", "--keep", "vectors")
    _profile(model_dir, b, tmp_path / "rb", "--keep", "tables")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "ra"), str(tmp_path / "rb"), "--out", str(tmp_path / "m")]) == 0
    assert "keeps no vectors tier" in capsys.readouterr().err
    m = load(tmp_path / "m")
    assert len(m.prompts) == 5 and "attn.diag" not in m.arrays and not any((tmp_path / "m/vectors").iterdir())
    doc = json.loads((tmp_path / "m/run.json").read_text())
    assert doc["keep_vectors"] is False and all(not f.startswith("vectors/") for s in doc["shards"] for f in s["files"])


def test_sql_answers_known_queries(model_dir, tmp_path, rng, capsys):
    c = tmp_path / "c.txt"
    c.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(2, 20, size=5)) + "\n")
    out = tmp_path / "r"
    _profile(model_dir, c, out, "--keep", "vectors")
    prof = load(out)
    capsys.readouterr()
    q = "select layer, head, avg(sink) as s from heads group by 1, 2 order by 3 desc"
    assert main(["sql", str(out), q, "--csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["layer", "head", "s"] and len(rows) == 1 + prof.n_layers * prof.n_heads
    sink = prof.arrays["attn.sink"].astype(np.float64).mean(-1)
    for layer, head, s in rows[1:]:
        assert float(s) == pytest.approx(sink[int(layer), int(head)], rel=1e-6)
    assert [float(r[2]) for r in rows[1:]] == sorted((float(r[2]) for r in rows[1:]), reverse=True)
    # per-prompt means, tokens and neurons
    assert main(["sql", str(out), "select prompt, layer, head, entropy from prompts where prompt = 2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ent = prof.arrays["attn.entropy"][:, :, prof.prompt_slice(2)].astype(np.float64).mean(-1)
    assert len(got) == prof.n_layers * prof.n_heads
    for r in got:
        assert r["entropy"] == pytest.approx(ent[r["layer"], r["head"]], rel=1e-6)
    assert set(ATTN_VECTORS) <= set(json.loads(_sql(capsys, out, "select * from prompts limit 1"))[0])
    n = json.loads(_sql(capsys, out, "select count(*) as n, sum(logit_entropy) as e from tokens"))[0]
    assert n["n"] == prof.n_tokens
    assert n["e"] == pytest.approx(float(prof.arrays["tokens.logit_entropy"].astype(np.float64).sum()), rel=1e-6)
    top = json.loads(_sql(capsys, out, "select layer, neuron, max from neurons order by max desc limit 1"))[0]
    assert top["max"] == pytest.approx(float(prof.arrays["mlp.neuron_max"].max()))
    assert main(["sql", str(out), "select nope from heads"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnscope: error: sql:") and "views of this run: heads" in err[0]
    assert "logit_lens" not in err[0] and "rules" not in err[0]  # this run has neither
    assert main(["sql", str(out), "select count(*) from heads"]) == 0
    assert capsys.readouterr().out.split()[-1] == str(prof.n_layers * prof.n_heads)
    # `prompt_index.token_offset`: each prompt's first token in the run
    idx = json.loads(_sql(capsys, out, "select n_tokens, token_offset from prompt_index order by prompt"))
    assert [r["token_offset"] for r in idx] == np.cumsum([0] + [r["n_tokens"] for r in idx])[:-1].tolist()
    # a reader that stops early (`| head -1`) is no error
    import subprocess
    import sys

    r = subprocess.run(
        f"{sys.executable} -m attnscope.cli sql {out} 'select * from tokens' | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout.startswith("prompt") and "Broken pipe" not in r.stderr and "Error" not in r.stderr, r.stderr


def _sql(capsys, run, q) -> str:
    assert main(["sql", str(run), q, "--json"]) == 0
    return capsys.readouterr().out


def test_key_scores_view_holds_the_per_key_vectors(model_dir, tmp_path, rng, capsys):
    """key_scores (built from the vectors tier, over several shards): every (prompt, layer, head, key) once, snapkv
    and h2o equal to the run's window_recv and recv_sum vectors; a run without the vectors says so in one line."""
    from attnscope.kernels.stats import RECV_SUM, WINDOW_RECV

    c = tmp_path / "c.txt"
    c.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(2, 20, size=5)) + "\n")
    out = tmp_path / "r"
    _profile(model_dir, c, out, "--keep", "vectors", "--shard-size", "2")
    prof = load(out)
    capsys.readouterr()
    assert main(["sql", str(out), "select * from key_scores", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == prof.n_tokens * prof.n_layers * prof.n_heads
    assert len({(r["prompt"], r["layer"], r["head"], r["position"]) for r in rows}) == len(rows)
    off = prof.arrays["prompts.offsets"]
    snap, h2o = prof.arrays[WINDOW_RECV.key], prof.arrays[RECV_SUM.key]
    for r in rows:
        t = off[r["prompt"]] + r["position"]
        assert r["snapkv"] == pytest.approx(float(snap[r["layer"], r["head"], t]), rel=1e-6)
        assert r["h2o"] == pytest.approx(float(h2o[r["layer"], r["head"], t]), rel=1e-6)
    q = "select position from key_scores where prompt = 3 and layer = 1 and head = 0 order by snapkv desc limit 3"
    assert main(["sql", str(out), q, "--json"]) == 0
    top = [r["position"] for r in json.loads(capsys.readouterr().out)]
    sl = prof.prompt_slice(3)
    assert top == list(np.argsort(-snap[1, 0, sl], kind="stable")[:3])
    tables = tmp_path / "t"
    _profile(model_dir, c, tables, "--keep", "tables")
    capsys.readouterr()
    assert main(["sql", str(tables), "select count(*) from key_scores"]) == 2
    assert "did not keep (the vectors tier" in capsys.readouterr().err


def test_per_prompt_distance_with_several_prompts_per_batch(model_dir, tmp_path, rng, capsys):
    c = tmp_path / "c.txt"
    c.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(2, 30, size=7)) + "\n")
    _profile(model_dir, c, tmp_path / "one", "--keep", "tables")
    _profile(model_dir, c, tmp_path / "many", "--keep", "tables", "--batch-size", "4")  # the last flag wins
    capsys.readouterr()
    q = "select prompt, layer, head, distance from prompts order by 1, 2, 3"
    one, many = (json.loads(_sql(capsys, tmp_path / r, q)) for r in ("one", "many"))
    assert len(one) == len(many) > 0
    d1, d4 = (np.array([r["distance"] for r in rows], dtype=np.float64) for rows in (one, many))
    assert np.isfinite(d4).all() and (d4 >= 0).all()
    np.testing.assert_allclose(d4, d1, rtol=1e-4, atol=1e-5)  # padding changes float32 rounding only
    assert len(np.unique(d1.round(6))) > 1  # prompts and heads differ: a per-batch sum would not pass


# -- sql is confined to the run: read-only, its own files only, the settings locked --


@pytest.fixture(scope="module")
def small_run(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sqlrun")
    c = d / "c.txt"
    c.write_text("the cat and the dog\nthe fox was in the tree by the river\nlight\n")
    _profile(model_dir, c, d / "r", "--keep", "vectors")
    return d / "r"


def _digest(root) -> dict[str, str]:
    """Every file (and link) under ``root``, by relative path: its sha256 (a link: where it points)."""
    out = {}
    for f in sorted(root.rglob("*")):
        rel = str(f.relative_to(root))
        if f.is_symlink():
            out[rel] = "-> " + os.readlink(f)
        elif f.is_file():
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


HOSTILE = [
    "copy (select * from heads) to '{outside}/heads.csv'",
    "copy (select 1 as x) to '{run}/run.json' (format json)",
    "copy heads to '{run}/index/s999999.parquet'",
    "select * from read_csv('/etc/passwd')",
    "select * from read_text('/etc/passwd')",
    "select * from read_blob('/etc/passwd')",
    "select * from read_text('{run}/run.json')",  # a file of the run that is not one of its tables
    "select * from glob('/root/*')",
    "select * from glob('{outside}/*')",
    "select * from read_parquet('{run}/index/../../outside/planted.parquet')",
    "select * from read_parquet('{outside}/planted.parquet')",
    "attach '{outside}/db.duckdb' as x",
    "detach memory",
    "install httpfs",
    "load httpfs",
    "set threads = 1",
    "reset threads",
    "set enable_external_access = true",
    "pragma version",
    "create table t as select * from heads",
    "insert into heads values (0)",
    "update heads set sink = 0",
    "delete from heads",
    "drop view tokens",
    "export database '{outside}/export'",
    "call pragma_version()",
    "checkpoint",
    "explain analyze copy (select 1) to '{outside}/e.csv'",
    "select * from query('copy (select 1) to ''{outside}/q.csv''')",
    "select 1; copy (select 1) to '{outside}/two.csv'",
    "select 1; select 2",
    "",
    "   ",
    "-- only a comment",
    "/* a comment */ ;",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_sql_refuses_what_is_not_a_read_of_the_run(small_run, tmp_path, capsys, query):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    shutil.copy(next((small_run / "index").glob("*.parquet")), outside / "planted.parquet")
    before, before_out = _digest(small_run), _digest(outside)
    capsys.readouterr()
    assert main(["sql", str(small_run), query.format(run=small_run, outside=outside)]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnscope: error: sql"), cap.err
    assert "secret" not in cap.out + cap.err and "root:" not in cap.out + cap.err
    assert _digest(small_run) == before  # byte-identical, and no file added
    assert _digest(outside) == before_out


def test_sql_refusals_say_what_and_how_to_export(small_run, capsys):
    for q, words in [
        ("copy heads to 'x.csv'", "COPY statements are refused"),
        ("attach 'x.db'", "ATTACH statements are refused"),
        ("set threads = 1", "SET statements are refused"),
        ("", "the query is empty"),
        ("select 1; select 2", "one statement, not 2"),
    ]:
        assert main(["sql", str(small_run), q]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        if "refused" in words:
            assert "--out FILE" in err


def test_sql_reads_the_run_in_every_select_form(small_run, capsys):
    prof = load(small_run)
    n = prof.n_tokens
    for q in [
        "select count(*) as n from tokens",
        "with t as (select * from tokens) select count(*) as n from t",
        "from tokens select count(*) as n",
        "select sum(n_tokens) as n from prompt_index",
        "select count(*) as n from (summarize tokens)",
        "select count(*) as n from '{tok}'",  # a table file of the run, named directly
    ]:
        q = q.format(tok=sorted((small_run / "tokens").glob("*.parquet"))[0])
        got = json.loads(_sql(capsys, small_run, q))[0]["n"]
        assert got == n or (q.startswith("select count(*) as n from (summarize") and got > 0), q
    for q in ["describe tokens", "show tables", "values (1, 2)", "explain select * from heads", "summarize heads"]:
        assert main(["sql", str(small_run), q]) == 0, q
    assert "prompt_index" in capsys.readouterr().out


@pytest.mark.parametrize("ext", ["csv", "json", "parquet"])
def test_sql_out_writes_the_result_atomically(small_run, tmp_path, capsys, ext):
    q = "select prompt, position, token, logit_entropy from tokens order by prompt, position"
    want = json.loads(_sql(capsys, small_run, q))
    before = _digest(small_run)
    out = tmp_path / f"res.{ext}"
    out.write_text("old")  # an existing file is replaced
    assert main(["sql", str(small_run), q, "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and f"wrote {len(want)} rows" in cap.err
    if ext == "csv":
        rows = list(csv.DictReader(io.StringIO(out.read_text())))
        got = [{"prompt": int(r["prompt"]), "position": int(r["position"]), "token": r["token"],
                "logit_entropy": float(r["logit_entropy"])} for r in rows]  # fmt: skip
    elif ext == "json":
        got = json.loads(out.read_text())
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(out).to_pylist()
    assert got == want
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left
    assert _digest(small_run) == before


def test_sql_out_never_writes_into_the_run(small_run, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(small_run)
    before = _digest(small_run)
    for out in [
        small_run / "heads.csv",
        small_run / "index" / "x.parquet",
        small_run / "run.json",
        link / "x.json",
        small_run,
        tmp_path / "x.txt",  # no known format
        tmp_path / "missing" / "x.csv",
    ]:
        assert main(["sql", str(small_run), "select * from heads", "--out", str(out)]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("attnscope: error: sql --out"), err
    assert _digest(small_run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_sql_out_of_memory_is_one_line(small_run, capsys, monkeypatch):
    import attnscope.cli.run as run_cli

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(run_cli, "_write_table", no_memory)
    assert main(["sql", str(small_run), "select * from tokens"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "--out" in err[0]


def test_sql_help_says_what_is_allowed(capsys):
    with pytest.raises(SystemExit):
        main(["sql", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "read-only" in text and "COPY" in text and "--out FILE" in text


def test_sql_connection_is_locked_and_explain_reads_only(small_run, capsys):
    import duckdb

    from attnscope.cli.run import sql_connection

    con = sql_connection(small_run)
    assert con.execute("select current_setting('lock_configuration')").fetchone()[0] is True
    assert con.execute("select current_setting('enable_external_access')").fetchone()[0] is False
    with pytest.raises(duckdb.Error):
        con.execute("set enable_external_access = true")
    assert con.execute("select count(*) from tokens").fetchone()[0] == load(small_run).n_tokens
    con.close()
    assert main(["sql", str(small_run), "explain analyze select count(*) from tokens"]) == 0
    for q in ["explain copy heads to 'x.csv'", "/* c */ explain analyze attach 'x.db'", "explain analyze"]:
        assert main(["sql", str(small_run), q]) == 2, q
        assert capsys.readouterr().err.startswith("attnscope: error: sql")
