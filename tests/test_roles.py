"""Head roles: scores from a profile equal the exact scores from the model's own eager attentions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main
from attnscope.kernels import KeyRanges
from attnscope.kernels.reference import attn_stats_from_probs_ref
from attnscope.render.roles import ROLE_THRESHOLDS, ROLES, head_roles, role_summary

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


def _scores(**heads):
    """``head_roles``-shaped scores of 1 layer x len(heads) heads: every score 0 except those given per head."""
    names = list(heads)
    r = {col: np.zeros((1, len(names))) for col, _ in ROLE_THRESHOLDS.values()}
    for h, name in enumerate(names):
        for col, v in heads[name].items():
            r[col][0, h] = v
    ratio = np.stack([r[col] / thr for col, thr in ROLE_THRESHOLDS.values()])
    labels = np.array(list(ROLE_THRESHOLDS), dtype=object)[ratio.argmax(0)]
    r["role"] = np.where(ratio.max(0) >= 1.0, labels, "mixed")
    return r


def test_role_summary_counts_passing_and_labelled_apart():
    # head 0 passes local (0.96 >= 0.8, 1.2x) and sink (0.9 >= 0.5, 1.8x): labelled sink, yet it passes local
    r = _scores(a={"sink": 0.9, "local": 0.96}, b={"local": 0.85}, c={"local": 0.7999})
    lines = role_summary(r, top=3)
    by_role = {line.split()[0]: line for line in lines}
    assert by_role["local"] == (
        "          local (local >= 0.8):   2 pass,   1 labelled local; highest 0:0 0.96 (sink), 0:1 0.85 (local), "
        "0:2 0.79 (mixed)"
    )  # 0.7999 is cut to 0.79: a score under the threshold never shows as reaching it
    assert by_role["sink"].startswith("           sink (sink >= 0.5):   1 pass,   1 labelled sink; highest 0:0 0.90")
    assert lines[-1] == (
        "          mixed (passes none):   1 heads; a head that passes several thresholds is labelled with the one it "
        "passes by the largest factor (score / threshold)"
    )
    assert len(lines) == len(ROLE_THRESHOLDS) + 1


def test_heads_summary_never_contradicts_itself(rng, tmp_path, capsys):
    import attnscope

    model, tok = tiny_model("llama", vocab=200), word_tokenizer()
    attnscope.profile(model, tok, [_repeated(rng), random_text(17, rng)], progress=False).save(tmp_path / "p")
    assert main(["heads", str(tmp_path / "p"), "--top", "1"]) == 0
    table = head_roles(attnscope.load(tmp_path / "p"))
    for line in capsys.readouterr().out.splitlines()[2:-1]:  # after the two files written, before "mixed"
        role, rest = line.split(maxsplit=1)
        col, thr = ROLE_THRESHOLDS[role]
        passing = int(rest.split("):")[1].split()[0])
        assert passing == int((table[col] >= thr).sum()) >= int((table["role"] == role).sum()), line


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
