"""The real SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, d_head 64) end to end, on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_argmax, assert_verbose_allclose

import attnscope
from attnscope.kernels import ATTN_VECTOR_STATS, AttnStatsSpec, KeyRanges
from attnscope.kernels.reference import attn_stats_from_probs_ref
from attnscope.kernels.stats import ARGMAX, span_key

TEXT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "smol"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    exe = [sys.executable, "-m", "attnscope.cli"]
    res = subprocess.run(
        [*exe, "profile", "--prompt", TEXT, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "run.json").is_file() and (out / "accum").is_dir()  # a run directory (profiler/store.py)
    res = subprocess.run([*exe, "render", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for kind in ("self", "final", "all"):
        png = out / "figures" / f"laminar_{kind}.png"
        assert png.is_file() and png.stat().st_size > 10_000
    prof = attnscope.load(out)
    assert prof.meta["model_id"] == "SmolLM2-135M-Instruct" and prof.n_layers == 30 and prof.n_heads == 9
    for kind in ("self", "final", "all"):
        grid, dens = prof.laminar(kind, points=2001, lo=-1.0, hi=2.0)
        mass = np.trapezoid(dens, grid, axis=1)  # [layers]
        assert mass == pytest.approx(np.ones(30), abs=1e-3), kind


def test_capture_matches_eager_on_real_weights(smollm2):
    model, tok, _ = smollm2
    batch = tok([TEXT, "Hello there"], return_tensors="pt", padding=True)
    spec = AttnStatsSpec(bins=512, thumb_size=16)
    _, stats = attnscope.run_with_stats(model, dict(batch), spec=spec, block_q=16)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    ranges = KeyRanges.from_attention_mask(batch["attention_mask"])
    for layer in (0, 14, 29):
        ref = attn_stats_from_probs_ref(eager.attentions[layer].double(), ranges, spec, batch["input_ids"])
        for v in ATTN_VECTOR_STATS:
            if v == ARGMAX.name:  # float32 near-ties may swap: exact where the two largest weights differ clearly
                assert_argmax(stats["attn"][layer][v], eager.attentions[layer], ranges, name=f"l{layer} {v}")
                continue
            assert_verbose_allclose(stats["attn"][layer][v], ref[v], atol=2e-5, rtol=1e-4, name=f"l{layer} {v}")


def needle_prompt(n_sentences: int = 125) -> tuple[str, dict]:
    """A needle-in-a-haystack prompt (~1.5k SmolLM2 tokens) with its gold answer, and its character spans."""
    rng = np.random.default_rng(5)
    words = "river stone light tree bird cloud road field house garden winter summer music paper window".split()
    sentences = [" ".join(rng.choice(words, 10)).capitalize() + "." for _ in range(n_sentences)]
    needle = "The special magic number of Lisbon is 7481."
    hay = " ".join(sentences[: n_sentences // 2]) + " "
    context = hay + needle + " " + " ".join(sentences[n_sentences // 2 :])
    question = "\nWhat is the special magic number of Lisbon? Answer:"
    answer = " The special magic number of Lisbon is 7481."
    text = context + question + answer
    q0, a0 = len(context), len(context) + len(question)
    spans = {"needle": [len(hay), len(hay) + len(needle)], "context": [0, q0], "question": [q0, a0],
             "answer": [a0, len(text)]}  # fmt: skip
    return text, spans


def test_span_attention_equals_eager_on_a_needle_prompt(smollm2):
    """Every span_attention mass and top1 of a ~1.5k-token needle prompt equals the eager attention's within 1e-4."""
    model, tok, model_id = smollm2
    text, spans = needle_prompt()
    prof = attnscope.profile(model, tok, [text], spans=[spans], progress=False, model_id=model_id)
    got = prof.arrays[span_key(0)]  # [Ly, H, Sq, Sk, 2]
    pieces = prof.prompts[0]["spans"]
    n = prof.n_tokens
    assert 1300 <= n <= 2000 and list(pieces) == list(spans)
    masks = []
    for v in pieces.values():
        m = torch.zeros(n, dtype=torch.float64)
        for a, b in v:
            m[a:b] = 1
        masks.append(m)
    qmasks = torch.stack(masks + [torch.nn.functional.one_hot(torch.tensor(n - 1), n).double()])  # [Sq, n]
    kmasks = torch.stack(masks)  # [Sk, n]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**tok(text, return_tensors="pt"), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for layer, att in enumerate(eager.attentions):
        p = att[0].double()  # [H, n, n]
        mass = torch.einsum("qi,hij,kj->hqk", qmasks, p, kmasks) / qmasks.sum(1)[None, :, None]
        top = kmasks.T[p.argmax(-1)]  # [H, n, Sk]
        top1 = torch.einsum("qi,hik->hqk", qmasks / qmasks.sum(1, keepdim=True), top)
        assert_verbose_allclose(got[layer, ..., 0], mass, atol=1e-4, rtol=0, name=f"l{layer} mass")
        assert_verbose_allclose(got[layer, ..., 1], top1, atol=1e-4, rtol=0, name=f"l{layer} top1")
        # the head scores of the literature, from their definitions on the eager attention
        ids = tok(text)["input_ids"]
        (a0, a1), (n0, n1) = pieces["answer"][0], pieces["needle"][0]
        hits = torch.zeros(p.shape[0])
        for t in range(a0, a1):  # row t - 1 predicts answer token t
            j = p[:, t - 1].argmax(-1)
            hits += torch.tensor([float(n0 <= int(x) < n1 and ids[int(x)] == ids[t]) for x in j])
        scores = prof.prompts[0]["scores"]
        np.testing.assert_allclose(scores["retrieval"][layer], (hits / (a1 - a0)).numpy(), atol=1e-12)
        np.testing.assert_allclose(scores["first_token"][layer], p[:, :64, 0].mean(-1).numpy(), atol=1e-5)


def test_python_api(smollm2, tmp_path):
    model, tok, model_id = smollm2
    a = attnscope.profile(model, tok, [TEXT], progress=False, model_id=model_id)
    b = attnscope.profile(model, tok, ["A second, shorter prompt."], progress=False, model_id=model_id)
    ab = a.merge(b)
    ab.save(tmp_path / "x")
    back = attnscope.load(tmp_path / "x")
    grid, density = back.laminar("self", points=300)
    assert grid.shape == (300,) and density.shape == (30, 300)
    assert len(back.prompts) == 2 and back.arrays["tokens.logit_entropy"].shape == (back.n_tokens,)
    ent = back.arrays["tokens.logit_entropy"]
    assert (ent >= 0).all() and (ent <= np.log(model.config.vocab_size) + 1e-3).all()


def test_gguf_file_loads_to_the_same_weights(smollm2, tmp_path):
    # the default model's cache keeps the GGUF it was converted from: loading it directly (as
    # `attnscope profile path/to/model.gguf` does) must give the very weights of the cached conversion
    from attnscope.profiler.engine import config_digest as _config_digest
    from attnscope.profiler.engine import weights_digest as _weights_digest
    from attnscope.profiler.models import cache_dir, load_model

    gguf = next((cache_dir() / "smollm2").glob("*.gguf"))
    model, tok, model_id = load_model(str(gguf), device="cpu", dtype="float32")
    assert model_id == str(gguf) and model.config.model_type == "llama"
    ref_model, ref_tok, _ = smollm2
    assert _weights_digest(model) == _weights_digest(ref_model)
    assert _config_digest(model) == _config_digest(ref_model)
    assert tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"]
