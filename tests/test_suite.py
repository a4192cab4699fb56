"""attnscope suite niah end to end on a tiny real model: the grid's prompts, spans, answers, run and figure."""

from __future__ import annotations

import json

import pytest
from helpers import random_text, word_tokenizer

from attnscope.cli import main
from attnscope.profiler.suites import niah_items, score_answer


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
        assert it.columns["length"] - 6 <= n <= it.columns["length"], (n, it.columns)
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
    # an existing run is not replaced without --force; --resume continues it with the answers it has
    assert main(argv) == 2
    (out / "suite.parquet").write_bytes((out / "suite.parquet").read_bytes())
    assert main(argv + ["--resume"]) == 0
    assert _sql(capsys, out, "select * from suite order by length, depth") == suite


def _suite_rows(fmt, rng):
    ctx = lambda: ". ".join(random_text(5, rng) for _ in range(4)) + "."  # noqa: E731
    if fmt == "ruler":
        return [{"index": i, "input": ctx() + "\n\nwhat is the dog?", "outputs": ["dog", "cat"], "length": 40,
                 "answer_prefix": " the dog is"} for i in range(3)]  # fmt: skip
    if fmt == "longbench":
        return [{"input": "where is the fox?", "context": ctx(), "answers": ["river", "tree"], "length": 30,
                 "dataset": "qa", "_id": f"x{i}"} for i in range(3)]  # fmt: skip
    if fmt == "longbench-v2":
        return [{"question": "which one?", "choice_A": "cat", "choice_B": "dog", "choice_C": "fox", "choice_D": "tree",
                 "answer": "B", "context": ctx(), "domain": "toy", "difficulty": "easy", "length": "short",
                 "_id": f"v{i}"} for i in range(3)]  # fmt: skip
    return [{"id": f"p{i}", "context": ctx(), "question": "what?", "answer": "the", "task": "t1"} for i in range(3)]


@pytest.mark.parametrize("fmt", ["ruler", "longbench", "longbench-v2", "plain"])
def test_suite_jsonl_formats(tiny_llama_dir, tmp_path, rng, capsys, fmt):
    f = tmp_path / "task.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _suite_rows(fmt, rng)))
    out = tmp_path / "run"
    argv = ["suite", "jsonl", str(f), str(tiny_llama_dir), "--format", fmt, "--max-new-tokens", "2", "--out", str(out),
            "--bins", "64", "--thumb-size", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = _sql(capsys, out, "select * from suite order by prompt_id")
    assert len(rows) == 3 and all(r["suite"] == fmt and isinstance(r["correct"], bool) for r in rows)
    assert {"ruler": "task", "longbench": "qa", "longbench-v2": "toy", "plain": "t1"}[fmt] == rows[0]["task"]
    if fmt == "longbench-v2":
        assert rows[0]["difficulty"] == "easy" and rows[0]["gold"] == "B"
    spans = _sql(capsys, out, "select distinct key_span from span_attention order by 1")
    assert [r["key_span"] for r in spans] == ["answer", "context", "question"]
    q = ("select s.task, p.layer, p.head, avg(a.mass) as context_mass from suite s join span_attention a using "
         "(prompt_id) join prompts p using (prompt_id, layer, head) where a.query_span = 'answer' and a.key_span = "
         "'context' group by 1, 2, 3 order by 4 desc limit 3")  # fmt: skip
    top = _sql(capsys, out, q)
    assert len(top) == 3 and top[0]["context_mass"] >= top[-1]["context_mass"] > 0
    if fmt == "plain":  # --keep-vectors: the per-key scores of the suite's prompts
        assert main(argv + ["--force", "--keep-vectors"]) == 0
        n = _sql(capsys, out, "select count(distinct prompt) as n from key_scores where h2o > 0")
        assert n == [{"n": 3}]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside ray.data
def test_suite_on_ray_equals_one_process(tiny_llama_dir, tmp_path, rng, capsys):
    """A suite under --ray (answers generated by the driver, prompts profiled by the actors) writes the run a
    single-process suite writes: the same suite rows and span attention."""
    ray = pytest.importorskip("ray")
    f = tmp_path / "task.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _suite_rows("plain", rng)))
    argv = ["suite", "jsonl", str(f), str(tiny_llama_dir), "--format", "plain", "--max-new-tokens", "2", "--bins",
            "64", "--thumb-size", "8", "--no-progress"]  # fmt: skip
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(argv + ["--out", str(tmp_path / "ray"), "--ray"]) == 0
    finally:
        ray.shutdown()
    capsys.readouterr()
    q = "select * from suite order by prompt_id"
    assert _sql(capsys, tmp_path / "one", q) == _sql(capsys, tmp_path / "ray", q)
    q = "select * from span_attention order by all"
    a, b = _sql(capsys, tmp_path / "one", q), _sql(capsys, tmp_path / "ray", q)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # the actors' thread count differs from this process's: float sums to rounding
        assert {k: v for k, v in x.items() if k != "mass"} == {k: v for k, v in y.items() if k != "mass"}
        assert x["mass"] == pytest.approx(y["mass"], abs=1e-6)


def test_suite_jsonl_errors_name_the_row(tiny_llama_dir, tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"input": "q", "answers": ["a"]}) + "\n")
    assert main(["suite", "jsonl", str(f), str(tiny_llama_dir), "--format", "longbench", "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 2  # fmt: skip
    assert "bad.jsonl:1: missing field(s) 'context'" in capsys.readouterr().err
