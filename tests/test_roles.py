"""Head roles: scores from a profile equal the exact scores from the model's own eager attentions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attnscope.kernels import KeyRanges
from attnscope.kernels.reference import attn_stats_from_probs_ref
from attnscope.render.roles import ROLES, head_roles
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main

SCORES = {"induction": "induction", "dup": "dup", "prev": "prev", "sink": "sink", "self": "diag"}


def _eager_scores(model, tok, prompts):
    """Per (layer, head) mean over every real row of every prompt, from the materialised eager attentions."""
    model.set_attn_implementation("eager")
    sums, rows = {}, 0
    try:
        for text in prompts:
            batch = tok([text], return_tensors="pt")
            with torch.no_grad():
                att = model(**batch, output_attentions=True).attentions
            L = batch["input_ids"].shape[1]
            rows += L
            for layer, p in enumerate(att):
                ref = attn_stats_from_probs_ref(p.double(), KeyRanges.full(1, L), tokens=batch["input_ids"])
                for name, vec in SCORES.items():
                    sums.setdefault(name, np.zeros((len(att), p.shape[1])))[layer] += ref[vec][0].sum(-1).numpy()
    finally:
        model.set_attn_implementation("sdpa")
    return {name: s / rows for name, s in sums.items()}


def _repeated(rng, n=25):
    text = random_text(n, rng)
    return f"{text} {text} {text}"


def test_roles_equal_eager_scores_tiny(rng, tmp_path):
    import attnscope

    model, tok = tiny_model("llama", vocab=200), word_tokenizer()
    prompts = [_repeated(rng), random_text(17, rng)]
    prof = attnscope.profile(model, tok, prompts, progress=False)
    r = head_roles(prof)
    exact = _eager_scores(model, tok, prompts)
    for name in SCORES:
        np.testing.assert_allclose(r[name], exact[name], atol=1e-5, err_msg=name)
    assert r["induction"].max() > 0  # the repeats make the scores non-trivial
    assert set(np.unique(r["role"])) <= set(ROLES)
    # the command line writes the table and the figure, and lists each role
    prof.save(tmp_path / "p")
    assert main(["heads", str(tmp_path / "p"), "--top", "2"]) == 0
    assert (tmp_path / "p" / "figures" / "head_roles.csv").is_file()
    assert (tmp_path / "p" / "figures" / "head_roles.png").stat().st_size > 5_000
    assert main(["heads", str(tmp_path / "p"), "--top", "0"]) == 2


@pytest.mark.slow
def test_induction_heads_of_smollm2(smollm2):
    # a passage repeated: the profile's scores equal the eager ones, so its top induction heads are the true ones
    import attnscope

    model, tok, model_id = smollm2
    passage = (
        "Marigold lanterns drift above the harbour while the ferryman counts copper coins and hums an old tune "
        "about salt, rope and the patient grey gulls that follow every boat home."
    )
    prompts = [f"{passage} {passage}"]
    prof = attnscope.profile(model, tok, prompts, progress=False, model_id=model_id)
    r = head_roles(prof)
    exact = _eager_scores(model, tok, prompts)
    for name in SCORES:
        np.testing.assert_allclose(r[name], exact[name], atol=2e-5, err_msg=name)
    top = np.argsort(-r["induction"].ravel())[:3]
    assert list(top) == list(np.argsort(-exact["induction"].ravel())[:3])
    assert r["induction"].max() > 0.3 and (r["role"] == "induction").any()
