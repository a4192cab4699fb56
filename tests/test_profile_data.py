"""Profile: merge equals profiling the union, save/load round-trips bit for bit, bad directories are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.kernels import AttnStatsSpec
from attnscope.profiler import Profile, ProfileError, load, profile

SPEC = AttnStatsSpec(bins=256, thumb_size=8)


@pytest.fixture(scope="module")
def setup():
    return tiny_model("gpt_neox", vocab=200), word_tokenizer()


def _prompts(rng, n):
    return [random_text(int(k), rng) for k in rng.integers(3, 30, size=n)]


def _assert_same(a: Profile, b: Profile, exact: bool):
    assert sorted(a.arrays) == sorted(b.arrays)
    assert a.prompts == b.prompts
    for name in a.arrays:
        x, y = a.arrays[name], b.arrays[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if exact:
            assert np.array_equal(x, y), name
        else:
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=0, err_msg=name)


def test_merge_equals_profiling_the_union(setup, rng):
    model, tok = setup
    pa, pb = _prompts(rng, 2), _prompts(rng, 3)
    kw = dict(spec=SPEC, progress=False, keep_full=[(1, 0)], top_k=3)
    merged = profile(model, tok, pa, **kw).merge(profile(model, tok, pb, **kw))
    together = profile(model, tok, pa + pb, **kw)
    _assert_same(merged, together, exact=False)  # float64 sums may round in another order


def test_save_load_roundtrip_bit_for_bit(setup, rng, tmp_path):
    model, tok = setup
    prof = profile(model, tok, _prompts(rng, 2), spec=SPEC, progress=False, keep_full=[(0, 1)])
    prof.save(tmp_path / "run")
    back = load(tmp_path / "run")
    _assert_same(prof, back, exact=True)
    assert back.meta == json.loads(json.dumps(prof.meta))
    assert "attn.full.p1.l0.h1" in back.arrays
    # the per-prompt token text and the laminar profile come back too
    assert back.prompts[0]["tokens"] and back.n_tokens == sum(p["n_tokens"] for p in back.prompts)


def test_merge_refuses_another_model(setup, rng, tmp_path):
    model, tok = setup
    a = profile(model, tok, _prompts(rng, 1), spec=SPEC, progress=False)
    other = tiny_model("gpt_neox", seed=1, vocab=200)  # same config, other weights
    b = profile(other, tok, _prompts(rng, 1), spec=SPEC, progress=False)
    with pytest.raises(ProfileError, match="weights_digest differs"):
        a.merge(b)
    c = profile(model, tok, _prompts(rng, 1), spec=AttnStatsSpec(bins=128, thumb_size=8), progress=False)
    with pytest.raises(ProfileError, match="spec differs"):
        a.merge(c)
    a.save(tmp_path / "x")
    c.save(tmp_path / "x")  # same model, other settings: a re-run replaces the profile
    with pytest.raises(ProfileError, match="another model's profile"):
        b.save(tmp_path / "x")
    b.save(tmp_path / "x", force=True)
    assert load(tmp_path / "x").meta["weights_digest"] == b.meta["weights_digest"]


def test_corrupted_and_foreign_directories(setup, rng, tmp_path):
    model, tok = setup
    prof = profile(model, tok, _prompts(rng, 1), spec=SPEC, progress=False)
    d = prof.save(tmp_path / "ok")
    with pytest.raises(ProfileError, match="not a profile directory"):
        load(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    with pytest.raises(ProfileError, match="missing"):
        load(tmp_path / "foreign")
    with pytest.raises(ProfileError, match="not empty and not a profile"):
        prof.save(tmp_path / "foreign")
    data = bytearray((d / "profile.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "profile.safetensors").write_bytes(bytes(data))
    with pytest.raises(ProfileError, match="checksum"):
        load(d)
    (d / "profile.json").write_text("{not json")
    with pytest.raises(ProfileError, match="corrupted"):
        load(d)
    (d / "profile.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ProfileError, match="not an attnscope profile"):
        load(d)


def test_crash_during_save_leaves_no_partial_directory(setup, rng, tmp_path, monkeypatch):
    model, tok = setup
    prof = profile(model, tok, _prompts(rng, 1), spec=SPEC, progress=False)
    old = prof.save(tmp_path / "run")
    before = (old / "profile.safetensors").read_bytes()
    import safetensors.numpy

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        prof.save(tmp_path / "run")
    with pytest.raises(OSError, match="disk full"):
        prof.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp or partial directory left
    assert (old / "profile.safetensors").read_bytes() == before


def test_laminar_shapes_and_normalisation(setup, rng):
    model, tok = setup
    prof = profile(model, tok, _prompts(rng, 3), spec=SPEC, progress=False)
    for which in ("self", "final", "all"):
        grid, dens = prof.laminar(which, points=301)
        assert grid.shape == (301,) and dens.shape == (prof.n_layers, 301)
        assert np.isfinite(dens).all() and (dens >= 0).all()
    with pytest.raises(ValueError, match="which"):
        prof.laminar("diagonal")
    with pytest.raises(IndexError, match="head 9"):
        prof.laminar("self", head=9)
