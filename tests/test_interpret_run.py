"""The interpretation layer inside a run: logit lens per token, neuron contexts, rules, and their SQL views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_text, tiny_model, word_tokenizer

import attnscope
from attnscope.cli import main
from attnscope.profiler.lens import logit_lens


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def _prompts(rng, n=7):
    return [random_text(int(k), rng) for k in rng.integers(3, 25, size=n)]


def test_lens_in_a_batched_profile_equals_the_lens_of_each_prompt(rng):
    model, tok = tiny_model("gpt_neox", vocab=200), word_tokenizer()
    prompts = _prompts(rng)
    prof = attnscope.profile(model, tok, prompts, progress=False, logit_lens=True, batch_size=3)
    for i, text in enumerate(prompts):
        _, lens = logit_lens(model, dict(tok([text], return_tensors="pt")), impl="torch")
        sl = prof.prompt_slice(i)
        for f in ("top_prob", "entropy", "target_prob", "final_prob"):
            np.testing.assert_allclose(prof.arrays[f"lens.{f}"][:, sl], lens[f].numpy(), atol=1e-5, err_msg=f)
        assert np.array_equal(prof.arrays["lens.top_id"][:, sl], lens["top_id"].numpy())
        assert np.array_equal(prof.arrays["lens.target_rank"][:, sl], lens["target_rank"].numpy())
        # the recorded next-token entropy comes from the same reduction: the last layer's lens
        np.testing.assert_allclose(prof.arrays["tokens.logit_entropy"][sl], lens["entropy"][-1].numpy(), atol=1e-6)
    assert set(prof.meta["lens_vocab"]) >= {str(int(t)) for t in np.unique(prof.arrays["lens.top_id"])}


def test_neuron_contexts_are_the_topk_of_every_token_and_merge(rng):
    model, tok = tiny_model("llama", vocab=200), word_tokenizer()
    a, b = _prompts(rng, 5), _prompts(rng, 4)
    kw = dict(progress=False, neuron_contexts=3, batch_size=1)  # one prompt a batch: the same float values
    pa, pb, pab = (attnscope.profile(model, tok, p, **kw) for p in (a, b, a + b))
    merged = pa.merge(pb)
    for name in ("mlp.ctx_value", "mlp.ctx_token"):
        assert np.array_equal(merged.arrays[name], pab.arrays[name]), name
    # against the down_proj inputs of every token, captured by a plain forward hook
    seen: dict[int, list] = {}
    mods = [layer.mlp.down_proj for layer in model.model.layers]
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(i[0][0]))
        for n, m in enumerate(mods)
    ]
    try:
        with torch.no_grad():
            for text in a + b:
                model(**tok([text], return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    for layer, xs in seen.items():
        x = torch.cat(xs)  # [T, d_ff] over all tokens in corpus order
        val, _ = x.topk(3, dim=0)  # [3, d_ff]
        np.testing.assert_allclose(pab.arrays["mlp.ctx_value"][layer], val.numpy(), rtol=1e-5, atol=1e-6)
        # each kept token holds its value (equal activations, e.g. the same first token of two prompts, may
        # tie: the earlier token is kept, where torch.topk may pick either)
        tok = torch.from_numpy(pab.arrays["mlp.ctx_token"][layer])  # [3, d_ff]
        np.testing.assert_allclose(x.gather(0, tok).numpy(), val.numpy(), rtol=1e-5, atol=1e-6)


def test_lens_rules_and_sql_on_a_run(model_dir, tmp_path, rng, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_prompts(rng, 9)))
    run = tmp_path / "run"
    argv = ["profile", str(model_dir), "--prompts", str(corpus), "--out", str(run), "--no-progress"]
    assert main([*argv, "--logit-lens", "--shard-size", "4"]) == 0
    prof = attnscope.load(run)
    Ly, T = prof.n_layers, prof.n_tokens
    assert prof.arrays["lens.top_prob"].shape == (Ly, T)
    capsys.readouterr()
    # the logit_lens view: one row per (token, layer), the same numbers as the arrays
    assert main(["sql", str(run), "select count(*) as n, avg(top_prob) as p from logit_lens", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert got["n"] == Ly * T and got["p"] == pytest.approx(float(np.mean(prof.arrays["lens.top_prob"])), rel=1e-5)
    assert main(["sql", str(run), "select role, count(*) as n from heads group by 1", "--json"]) == 0
    assert sum(r["n"] for r in json.loads(capsys.readouterr().out)) == Ly * prof.n_heads
    # figures and rules from the saved run
    assert main(["lens", str(run), "--prompt", "2"]) == 0
    assert (run / "figures" / "logit_lens_p2.png").stat().st_size > 5_000
    assert main(["report", str(run), "--prompt", "1"]) == 0
    html = (run / "report.html").read_text()
    assert '<section id="roles">' in html and '<section id="lens">' in html
    assert main(["rules", str(run), "--model", str(model_dir), "--top-neurons", "2", "--promoted", "3"]) == 0
    rules = json.loads((run / "rules.json").read_text())
    assert len(rules) == 2 * Ly
    r0 = rules[0]
    assert {"trigger", "activation_neuron", "adds_logit_bias", "contexts"} <= set(r0) and len(
        r0["adds_logit_bias"]
    ) == 3
    assert r0["activation"] == pytest.approx(
        float(prof.arrays["mlp.ctx_value"][r0["layer"], 0, r0["activation_neuron"]]), abs=1e-4
    )
    capsys.readouterr()
    assert main(["sql", str(run), "select count(*) as n from rules where rank = 0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n"] == 2 * Ly
    # clear errors
    assert main(["lens", str(run), "--prompt", "99"]) == 2
    plain = tmp_path / "plain"
    assert main(["profile", str(model_dir), "--prompt", "one two three", "--out", str(plain), "--no-progress"]) == 0
    assert main(["lens", str(plain)]) == 2
    assert "--logit-lens" in capsys.readouterr().err
