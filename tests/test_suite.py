"""attnscope suite niah end to end on a tiny real model: the grid's prompts, spans, answers, run and figure."""

from __future__ import annotations

import json

import pytest
from attnscope.profiler.suites import niah_items, score_answer
from helpers import random_text, word_tokenizer

from attnscope.cli import main


def _sql(capsys, run, q):
    capsys.readouterr()
    assert main(["sql", str(run), q, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_niah_prompts_hit_their_length_and_depth(rng):
    tok = word_tokenizer()
    hay = ". ".join(random_text(4, rng) for _ in range(90)) + "."
    items = niah_items(tok, hay, [40, 90], [0.0, 0.5, 1.0], needle="the fox is in the river.", question="where is "
                       "the fox?", answer="river")  # fmt: skip
    assert [it.columns for it in items] == [{"length": n, "depth": d} for n in (40, 90) for d in (0.0, 0.5, 1.0)]
    for it in items:
        text, sp = it.item.text, it.item.spans
        n = len(tok(text)["input_ids"])
        assert abs(n - it.columns["length"]) <= 3, (n, it.columns)
        (n0, n1), (q0, q1), (a0, a1) = sp["needle"][0], sp["question"][0], sp["answer"][0]
        assert text[n0:n1] == "the fox is in the river." and text[a0:a1] == "river" and text.startswith(it.prompt)
        assert "where is the fox?" in text[q0:q1] and sp["context"][0] == (0, q0)
        at = n0 / (q0 - len("the fox is in the river.") - 1)  # where in the haystack (sentences of ~25 characters)
        assert {0.0: at < 0.05, 1.0: at > 0.6}.get(it.columns["depth"], 0.2 < at < 0.8), (it.columns, at)
        assert n0 == 0 or text[n0 - 2] in ".!?"  # at a sentence boundary


def test_answers_are_scored():
    assert score_answer(" The number is 7481.", "7481") and not score_answer("7418", "7481")
    assert score_answer(" Paris. ", "paris", "exact") and not score_answer("Paris is", "paris", "exact")
    assert score_answer("B) because", "B", "choice") and not score_answer("A", "B", "choice")
    with pytest.raises(ValueError):
        score_answer("x", "y", "fuzzy")


def test_suite_niah_end_to_end(tiny_llama_dir, tmp_path, rng, capsys):
    hay = tmp_path / "hay.txt"
    hay.write_text(". ".join(random_text(10, rng) for _ in range(40)) + ".")
    out = tmp_path / "run"
    argv = ["suite", "niah", str(tiny_llama_dir), "--haystack", str(hay), "--lengths", "48,80", "--depths", "0,0.5,1",
            "--needle", "the fox is in the river.", "--question", "where is the fox?", "--answer", "river",
            "--max-new-tokens", "3", "--out", str(out), "--bins", "64", "--thumb-size", "8",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "2 lengths x 3 depths" in said and "top retrieval heads" in said
    assert (out / "figures" / "niah.png").stat().st_size > 10_000
    suite = _sql(capsys, out, "select * from suite order by length, depth")
    assert [(r["length"], r["depth"]) for r in suite] == [(n, d) for n in (48, 80) for d in (0.0, 0.5, 1.0)]
    assert all(isinstance(r["correct"], bool) and r["generated"] is not None for r in suite)
    got = _sql(capsys, out, "select s.length, s.depth, count(*) as n, avg(a.mass) as m from suite s join "
               "span_attention a using (prompt_id) where a.query_span = 'answer' and a.key_span = 'needle' "
               "group by 1, 2")  # fmt: skip
    assert len(got) == 6 and all(r["n"] == 2 * 4 and 0 < r["m"] < 1 for r in got)  # tiny llama: 2 layers, 4 heads
    ret = _sql(capsys, out, "select count(*) as n, count(retrieval) as r, avg(first_token) as f from prompts")[0]
    assert ret["n"] == ret["r"] == 6 * 8 and 0 < ret["f"] <= 1
    # an existing run is not replaced without --force
    assert main(argv[:-1] + ["--no-progress"]) == 2
