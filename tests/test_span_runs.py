"""Named spans through a corpus run: JSONL/CSV/Parquet spans, characters to tokens, the span_attention SQL view,
merge and resume, and clear errors for spans that do not fit their text."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from helpers import profile_corpus, random_text

from attnscope.cli import main
from attnscope.kernels.stats import span_key
from attnscope.profiler import load
from attnscope.profiler.corpus import Corpus, CorpusError


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


_profile = profile_corpus


def _rows(rng, n, prefix):
    """JSONL rows: words of a random text, with the spans `a` (one word range) and `b` (two pieces) in characters
    (some rows without spans); their expected token pieces follow from the words (the tokenizer splits at spaces
    and adds no special token)."""
    out, want = [], []
    for i in range(n):
        words = random_text(int(rng.integers(8, 25)), rng).split()
        text = " ".join(words)
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
        row = {"id": f"{prefix}{i}", "text": text}
        if i % 3 != 2:
            a0, a1 = sorted(rng.choice(len(words), 2, replace=False))
            b = [[int(starts[0]), int(starts[1]) + 1], [int(starts[-1]) + 1, len(text)]]  # partial words count
            row["spans"] = {"a": [int(starts[a0]), int(starts[a1] + len(words[a1]))], "b": b}
            want.append({"a": [[int(a0), int(a1) + 1]], "b": [[0, 2], [len(words) - 1, len(words)]]})
        else:
            want.append(None)
        out.append(row)
    return out, want


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sql(capsys, run, q):
    capsys.readouterr()
    assert main(["sql", str(run), q, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_spans_of_a_corpus_run(model_dir, tmp_path, rng, capsys):
    rows, want = _rows(rng, 7, "p")
    _write(tmp_path / "c.jsonl", rows)
    assert _profile(model_dir, tmp_path / "c.jsonl", tmp_path / "r") == 0
    prof = load(tmp_path / "r")
    for i, w in enumerate(want):
        assert prof.prompts[i].get("spans") == w, i
        assert (span_key(i) in prof.arrays) == (w is not None)
    got = _sql(
        capsys, tmp_path / "r", "select * from span_attention order by prompt, layer, head, query_span, key_span"
    )
    n_with = sum(w is not None for w in want)
    assert len(got) == n_with * prof.n_layers * prof.n_heads * 3 * 2  # query spans a, b, last; key spans a, b
    for r in got[:: max(1, len(got) // 50)]:
        a = prof.arrays[span_key(r["prompt"])]
        q, k = ["a", "b", "last"].index(r["query_span"]), ["a", "b"].index(r["key_span"])
        assert r["mass"] == pytest.approx(float(a[r["layer"], r["head"], q, k, 0]), abs=1e-7)
        assert r["top1"] == pytest.approx(float(a[r["layer"], r["head"], q, k, 1]), abs=1e-7)
        assert 0 <= r["mass"] <= 1 + 1e-6 and 0 <= r["top1"] <= 1
    assert rows[0]["id"] == _sql(capsys, tmp_path / "r", "select prompt_id from span_attention limit 1")[0]["prompt_id"]
    ix = _sql(capsys, tmp_path / "r", "select prompt, spans from prompt_index order by prompt")
    assert [json.loads(x["spans"]) if x["spans"] else None for x in ix] == want
    # the in-memory profile of the same prompts holds the same arrays
    from attnscope.kernels import AttnStatsSpec
    from attnscope.profiler import ProfileConfig, profile
    from attnscope.profiler.models import load_model

    model, tok, _ = load_model(str(model_dir), device="cpu", dtype="float32")
    cfg = ProfileConfig(spec=AttnStatsSpec(bins=64, thumb_size=8), top_k=3, batch_size=1, progress=False)
    mem = profile(model, tok, [r["text"] for r in rows], cfg, spans=[r.get("spans") for r in rows])
    for i, w in enumerate(want):
        if w is not None:
            np.testing.assert_allclose(mem.arrays[span_key(i)], prof.arrays[span_key(i)], atol=2e-6, err_msg=str(i))
    cols = mem.span_attention()
    assert len(cols["mass"]) == len(got)
    from attnscope.render.report import write_report

    html = write_report(mem, tmp_path / "rep.html", prompt=0).read_text()
    assert 'id="spans"' in html and "answer span (or the final token)" in html
    assert 'id="spans"' not in write_report(mem, tmp_path / "rep2.html", prompt=2).read_text()  # no spans there


def test_spans_survive_merge_and_resume(model_dir, tmp_path, rng, capsys):
    ra, _ = _rows(rng, 4, "a")
    rb, _ = _rows(rng, 5, "b")
    _write(tmp_path / "a.jsonl", ra)
    _write(tmp_path / "b.jsonl", rb)
    _write(tmp_path / "ab.jsonl", ra + rb)
    for src in ("a", "b", "ab"):
        assert _profile(model_dir, tmp_path / f"{src}.jsonl", tmp_path / f"r{src}") == 0
    assert main(["merge", str(tmp_path / "ra"), str(tmp_path / "rb"), "--out", str(tmp_path / "m")]) == 0
    q = "select * from span_attention order by prompt, layer, head, query_span, key_span"
    merged, one = _sql(capsys, tmp_path / "m", q), _sql(capsys, tmp_path / "rab", q)
    assert len(merged) == len(one) > 0
    for x, y in zip(merged, one):
        assert {k: v for k, v in x.items() if k not in ("mass", "top1")} == {
            k: v for k, v in y.items() if k not in ("mass", "top1")
        }
        assert x["mass"] == pytest.approx(y["mass"], abs=1e-6) and x["top1"] == pytest.approx(y["top1"], abs=1e-6)
    m, o = load(tmp_path / "m"), load(tmp_path / "rab")
    assert [p.get("spans") for p in m.prompts] == [p.get("spans") for p in o.prompts]
    # appending to a run continues the spans table
    _write(tmp_path / "more.jsonl", rb)
    assert _profile(model_dir, tmp_path / "more.jsonl", tmp_path / "ra", "--append") == 0
    assert len(_sql(capsys, tmp_path / "ra", q)) == len(one)


def test_a_run_without_spans_has_an_empty_view(model_dir, tmp_path, rng, capsys):
    (tmp_path / "c.txt").write_text(random_text(10, rng) + "\n")
    assert _profile(model_dir, tmp_path / "c.txt", tmp_path / "r") == 0
    assert _sql(capsys, tmp_path / "r", "select count(*) as n from span_attention") == [{"n": 0}]


@pytest.mark.parametrize(
    "spans, message",
    [
        ({"x": [3, 400]}, "lies outside the text"),
        ({"x": [5, 5]}, "empty"),
        ({"x": "nope"}, "must be \\[start, end\\]"),
        ([1, 2], "must map names"),
        ({"x": [3, 4], "last": [0, 2]}, "'last'"),
    ],
)
def test_bad_spans_name_the_row(model_dir, tmp_path, capsys, spans, message):
    text = "the cat and the dog"
    _write(tmp_path / "c.jsonl", [{"id": "a", "text": text}, {"id": "b", "text": text, "spans": spans}])
    capsys.readouterr()
    assert _profile(model_dir, tmp_path / "c.jsonl", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "c.jsonl:2" in err or "prompt" in err
    import re

    assert re.search(message, err), err


def test_a_span_of_only_spaces_covers_no_token(model_dir, tmp_path, capsys):
    _write(tmp_path / "c.jsonl", [{"id": "q", "text": "the cat  and the dog", "spans": {"gap": [7, 9]}}])
    assert _profile(model_dir, tmp_path / "c.jsonl", tmp_path / "r") == 2
    assert "prompt 'q': span 'gap' covers no token" in capsys.readouterr().err


def test_csv_and_parquet_spans(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "spans"])
    w.writerow(["the cat", json.dumps({"n": [4, 7]})])
    w.writerow(["the dog", ""])
    (tmp_path / "c.csv").write_text(buf.getvalue())
    items = list(Corpus(corpora=[str(tmp_path / "c.csv")]))
    assert items[0].spans == {"n": [(4, 7)]} and items[1].spans is None
    t = pa.table({"text": ["the cat", "a dog"], "spans": [{"n": [[0, 3], [4, 7]]}, None]})
    pq.write_table(t, tmp_path / "c.parquet")
    items = list(Corpus(corpora=[str(tmp_path / "c.parquet")]))
    assert items[0].spans == {"n": [(0, 3), (4, 7)]} and items[1].spans is None
    t = pa.table({"text": ["the cat"], "marks": [json.dumps({"n": [0, 9]})]})
    pq.write_table(t, tmp_path / "d.parquet")
    with pytest.raises(CorpusError, match="d.parquet row 0: span 'n' piece \\[0, 9\\]"):
        list(Corpus(corpora=[str(tmp_path / "d.parquet")], spans_column="marks"))
