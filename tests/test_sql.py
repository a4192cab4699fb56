"""attnscope merge equals one run of both corpora; attnscope sql answers known queries over the Parquet files."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from attnscope.profiler import load
from attnscope.profiler.data import ACCUM_NAMES, ATTN_VECTORS
from helpers import random_text

from attnscope.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def _profile(model_dir, corpus, out, *extra):
    argv = ["profile", str(model_dir), "--prompts", str(corpus), "--out", str(out), "--bins", "64"]
    # one prompt per forward: the runs cut the corpus into other batches, and padding changes float32 rounding
    argv += ["--thumb-size", "8", "--top-k", "3", "--shard-size", "3", "--batch-size", "1", "--no-progress", *extra]
    assert main(argv) == 0


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
