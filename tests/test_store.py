"""Run directories: several shards equal one shard and the in-memory profile; accumulators equal their definitions;
the tables hold what the arrays hold; one writer at a time; --force never deletes what is not a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main
from attnscope.kernels import AttnStatsSpec
from attnscope.profiler import load, profile
from attnscope.profiler.data import ACCUM_NAMES, ATTN_VECTORS
from attnscope.profiler.run import ProfileConfig, prompt_items, run_corpus
from attnscope.profiler.store import RunError, RunWriter

SPEC = AttnStatsSpec(bins=64, thumb_size=8)


@pytest.fixture(scope="module")
def setup():
    return tiny_model("llama", vocab=200), word_tokenizer()


def _prompts(rng, n, lo=2, hi=24):
    return [random_text(int(k), rng) for k in rng.integers(lo, hi, size=n)]


def _write_run(path, model, tok, prompts, **kw):
    cfg = ProfileConfig(spec=SPEC, progress=False, top_k=3, **kw)
    from attnscope.profiler.run import run_meta

    with RunWriter(path, run_meta(model, tok, cfg)) as w:
        run_corpus(model, tok, prompt_items(prompts), w.commit, cfg)
    return load(path)


def _assert_arrays_equal(a, b, names, exact=True):
    for name in names:
        x, y = np.asarray(a.arrays[name]), np.asarray(b.arrays[name])
        assert x.shape == y.shape and x.dtype == y.dtype, (name, x.shape, y.shape, x.dtype, y.dtype)
        if exact or x.dtype.kind in "iu":
            assert np.array_equal(x, y), name
        else:
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12, err_msg=name)


def test_shards_equal_one_shard_and_in_memory(setup, rng, tmp_path):
    model, tok = setup
    prompts = _prompts(rng, 7)
    mem = profile(model, tok, prompts, spec=SPEC, progress=False, top_k=3, keep_full=[(1, 2)])
    one = _write_run(tmp_path / "one", model, tok, prompts, shard_size=100, keep_full=((1, 2),))
    many = _write_run(tmp_path / "many", model, tok, prompts, shard_size=3, keep_full=((1, 2),))
    assert len(json.loads((tmp_path / "many/run.json").read_text())["shards"]) == 3
    assert sorted(mem.arrays) == sorted(one.arrays) == sorted(many.arrays)
    assert [dict(p, id=None) for p in many.prompts] == [dict(p, id=None) for p in mem.prompts]
    assert [p["id"] for p in many.prompts] == [p["id"] for p in one.prompts]
    per_prompt = [n for n in mem.arrays if n not in ACCUM_NAMES]
    # batch size 1: every per-token number is the same computation, bit for bit
    _assert_arrays_equal(many, mem, per_prompt)
    _assert_arrays_equal(one, mem, list(mem.arrays))
    # float64 sums over shards add in another grouping
    _assert_arrays_equal(many, mem, [n for n in ACCUM_NAMES if n in mem.arrays], exact=False)  # dense: no experts
    assert repr(many).startswith("Profile(") and len(repr(many)) < 200


def test_accumulators_equal_their_definitions(setup, rng):
    model, tok = setup
    prompts = _prompts(rng, 5, 1, 20)
    prof = profile(model, tok, prompts, spec=SPEC, progress=False, batch_size=3)
    a, Ly, H, nb = prof.arrays, prof.n_layers, prof.n_heads, SPEC.bins
    off = prof.offsets
    for which, v in (("self", "diag"), ("final", "final")):
        x = a[f"attn.{v}"].astype(np.float64)  # [Ly, H, T]
        want = np.zeros((Ly, H, nb), np.int64)
        for layer in range(Ly):
            for h in range(H):
                want[layer, h] = np.bincount(np.minimum((x[layer, h] * nb).astype(int), nb - 1), minlength=nb)
        # a value within float32 rounding of a bin edge may fall either side: totals equal, prefix sums within 2
        assert np.array_equal(a[f"attn.{which}_hist"].sum(-1), want.sum(-1))
        assert np.abs(np.cumsum(a[f"attn.{which}_hist"], -1) - np.cumsum(want, -1)).max() <= 2
        mom = np.stack([np.full((Ly, H), x.shape[-1]), x.sum(-1), (x * x).sum(-1)], -1)
        np.testing.assert_allclose(a[f"attn.{which}_moments"], mom, rtol=1e-6)
    means = prof.head_means()
    assert list(means) == list(ATTN_VECTORS)
    for v in ATTN_VECTORS:
        np.testing.assert_allclose(means[v], a[f"attn.{v}"].astype(np.float64).mean(-1), rtol=1e-6, atol=1e-9)
    # relative-position thumbnail: mean over prompts of each prompt's thumbnail placed at its relative cells
    R = SPEC.thumb_size
    total, count = np.zeros((Ly, H, R, R)), np.zeros((R, R), np.int64)
    for i in range(len(prompts)):
        L = int(off[i + 1] - off[i])
        rp = min(R, L)
        rel = [(-(-t * L // rp)) * R // L for t in range(rp)]
        th = a[f"attn.thumb.p{i}"]
        for x in range(rp):
            for y in range(rp):
                total[:, :, rel[x], rel[y]] += th[:, :, x, y]
                count[rel[x], rel[y]] += 1
    np.testing.assert_allclose(a["attn.thumb_rel"], total, rtol=1e-12)
    assert np.array_equal(a["attn.thumb_rel_count"], count)


@pytest.mark.filterwarnings("ignore:binned KDE")  # 64 bins on purpose: the warning is right and beside the point
def test_tables_tier_serves_the_views(setup, rng, tmp_path):
    """Without the vectors tier: laminar from the histograms, head means from row sums, clear errors otherwise."""
    import pyarrow.parquet as pq

    from attnscope.profiler import ProfileError

    model, tok = setup
    prompts = _prompts(rng, 6)
    full = _write_run(tmp_path / "v", model, tok, prompts, shard_size=4, batch_size=2)
    lite = _write_run(tmp_path / "t", model, tok, prompts, shard_size=4, batch_size=2, keep_vectors=False)
    assert not any((tmp_path / "t/vectors").iterdir())
    _assert_arrays_equal(lite, full, [n for n in lite.arrays])
    for which in ("self", "final", "all"):
        grid, dens = lite.laminar(which, points=101)
        assert dens.shape == (lite.n_layers, 101) and np.isfinite(dens).all()
    with pytest.raises(ProfileError, match="did not keep the per-token per-head vectors"):
        lite.arrays["attn.entropy"][0, 0, :3]
    with pytest.raises(ProfileError, match="--keep vectors"):
        np.asarray(lite.arrays["attn.sink"])
    for v in ATTN_VECTORS:  # the per-head tables' mean over tokens comes from the accumulators
        want = np.asarray(full.arrays[f"attn.{v}"]).astype(np.float64).mean(-1)
        np.testing.assert_allclose(lite.arrays[f"attn.{v}"].mean(-1), want, rtol=1e-6, atol=1e-9)
    with pytest.raises(ProfileError, match="thumbnails"):
        lite.arrays["attn.thumb.p0"]
    for v, m in lite.head_means().items():
        np.testing.assert_allclose(m, full.arrays[f"attn.{v}"].astype(np.float64).mean(-1), rtol=1e-6, atol=1e-9)
    # the per-(prompt, layer, head) table holds each prompt's mean of every vector
    t = pq.read_table(tmp_path / "t/prompts").to_pydict()
    Ly, H = lite.n_layers, lite.n_heads
    assert len(t["prompt"]) == len(prompts) * Ly * H
    for r in rng.integers(0, len(t["prompt"]), size=10):
        p, layer, h = t["prompt"][r], t["layer"][r], t["head"][r]
        sl = full.prompt_slice(p)
        for v in ATTN_VECTORS:
            assert t[v][r] == pytest.approx(float(full.arrays[f"attn.{v}"][layer, h, sl].astype(np.float64).mean()))
    # the token table round-trips the per-token arrays; prompts keep their token text
    assert lite.prompts[3]["tokens"] == full.prompts[3]["tokens"] == prompts[3].split()


def test_one_writer_at_a_time(setup, rng, tmp_path, capsys):
    """A second writer (another process holding the lock) is refused with one line; a dead one holds nothing."""
    model, tok = setup
    out = tmp_path / "r"
    _write_run(out, model, tok, _prompts(rng, 2))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from attnscope.profiler.store.writer import _Lock; from pathlib import Path; "
            "l = _Lock(Path(sys.argv[1])); l.acquire(); print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["profile", "x", "--prompt", "cat", "--out", str(out), "--append"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is busy: another attnscope process is writing it" in err[0], err
        with pytest.raises(RunError, match="busy"):
            RunWriter(out, {}, "resume").open()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    w = RunWriter(out, load(out).meta, "resume")
    w.open()
    w.close()
    assert len(load(out).prompts) == 2


def test_force_never_deletes_a_foreign_directory(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    rc = main(["profile", "x", "--prompt", "cat", "--out", str(d), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "never deletes a directory that is not a run" in err[0], err
    assert (d / "notes.txt").read_text() == "precious" and sorted(os.listdir(d)) == ["notes.txt"]


@pytest.mark.parametrize("where", ["file", "sys"])
def test_unwritable_out_is_one_line(setup, tmp_path, where, monkeypatch):
    """An --out under a file, or on a read-only file system: one line, exit code 2, nothing left behind."""
    model, tok = setup
    if where == "file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
    else:
        if not os.path.isdir("/sys"):
            pytest.skip("no /sys here")
        out = "/sys/attnscope-test-run"
    with pytest.raises(RunError, match=r"cannot (create|write) --out"):
        RunWriter(out, {}, "new").open()
    before = sorted(os.listdir(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "attnscope.cli", "profile", "m", "--prompt", "a", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnscope: error:"), r.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_unfinished_run_says_resume(setup, rng, tmp_path, capsys):
    model, tok = setup
    out = tmp_path / "r"
    cfg = ProfileConfig(spec=SPEC, progress=False, shard_size=2)
    from attnscope.profiler.run import run_meta

    w = RunWriter(out, run_meta(model, tok, cfg))
    w.open()
    run_corpus(model, tok, prompt_items(_prompts(rng, 3)), w.commit, cfg)
    w.close(complete=False)  # as if killed after its last commit
    (out / "tokens" / "s000009.parquet").write_bytes(b"half a shard")  # a killed writer's leftover
    t0 = time.time()
    rc = main(["profile", "x", "--prompt", "cat", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds an unfinished run (3 prompts committed): --resume continues it" in err, err
    assert time.time() - t0 < 5  # refused before loading any model
    w = RunWriter(out, load(out).meta, "resume")
    w.open()
    w.close()
    assert not (out / "tokens" / "s000009.parquet").exists()


def test_per_prompt_reads_touch_only_their_shards(setup, rng, tmp_path):
    """A per-prompt slice of a per-token array reads the shards it spans, and equals the whole array's slice."""
    from attnscope.profiler.store import LazyTokenArray

    model, tok = setup
    prof = _write_run(tmp_path / "r", model, tok, _prompts(rng, 9), shard_size=2, batch_size=2)
    off = prof.offsets
    names = ["tokens.logit_entropy", "tokens.ids", "mlp.in_norm", "mlp.topk_val", "attn.entropy", "attn.final"]
    whole = {n: np.asarray(load(tmp_path / "r").arrays[n]) for n in names}
    for n in names:
        lazy = prof.arrays[n]
        assert isinstance(lazy, LazyTokenArray) and lazy.shape == whole[n].shape and lazy.dtype == whole[n].dtype
        for p in (0, 4, 8):
            sl = prof.prompt_slice(p)
            key = {0: sl, 1: (slice(None), sl), 2: (1, 2, sl)}[lazy.axis]
            assert np.array_equal(lazy[key], whole[n][key]), (n, p)
        a, b = int(off[1]) + 1, int(off[6]) - 1  # across shard boundaries
        key = {0: slice(a, b), 1: (0, slice(a, b)), 2: (slice(None), 1, slice(a, b))}[lazy.axis]
        assert np.array_equal(lazy[key], whole[n][key]), n
        assert lazy._full is None and len(lazy._parts) <= 4  # never read the whole run for these
        assert np.array_equal(lazy.mean(-1), whole[n].mean(-1))  # anything else: the whole array, once


def test_a_killed_ray_runs_staging_does_not_block_the_next_run(setup, rng, tmp_path):
    """A Ray run killed before its first commit leaves only .lock and .staging/: the directory counts as empty,
    and the next writer deletes the staged files."""
    model, tok = setup
    out = tmp_path / "r"
    (out / ".staging" / "tokens").mkdir(parents=True)
    (out / ".staging" / "tokens" / "s000000.parquet").write_bytes(b"half a shard")
    (out / ".lock").write_text("123\n")
    _write_run(out, model, tok, _prompts(rng, 2))
    assert not (out / ".staging").exists() and len(load(out).prompts) == 2


def test_report_and_laminar_views_of_a_run_without_vectors(setup, rng, tmp_path):
    """The whole-run views of a corpus run (no vectors tier): ``render`` (every laminar kind, their scales drawn from
    the histograms and moments) and the HTML report, whose per-prompt sections need a prompt's vectors."""
    model, tok = setup
    out = tmp_path / "t"
    lite = _write_run(out, model, tok, _prompts(rng, 5), shard_size=2, keep_vectors=False)
    assert "attn.diag" not in lite.arrays
    assert main(["render", str(out), "--out", str(tmp_path / "fig")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "fig").rglob("*.png"))
    assert any("self" in p for p in pngs) and any("final" in p for p in pngs), pngs
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Laminar" in html and "Heads" in html


def test_save_arrays_writes_safetensors_own_bytes(tmp_path):
    """The accumulators and vectors are written straight from the arrays (no in-memory copy of the file): the bytes
    must be what safetensors itself writes, and the returned digest their sha256."""
    import hashlib

    from safetensors.numpy import load_file, save

    from attnscope.profiler.store.layout import save_arrays

    rng = np.random.default_rng(3)
    arrays = {
        "attn.hist": rng.integers(0, 1 << 40, (3, 2, 7)),
        "b": rng.standard_normal((3, 5)),
        "a": rng.integers(0, 9, 7).astype(np.int32),
        "empty": np.zeros((0, 4), np.float32),
        "mask": rng.random((2, 3)) > 0.5,
        "half": rng.standard_normal(5).astype(np.float16),
        "bytes": np.arange(5, dtype=np.uint8),
        "strided": rng.standard_normal((4, 3)).T,
        "scalar": np.array(3.5),
        "small": np.arange(3, dtype=np.int16),
    }
    digest = save_arrays(arrays, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    assert digest == hashlib.sha256(data).hexdigest()
    back = load_file(tmp_path / "x.safetensors")
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k].reshape(v.shape), v), k
    assert not list(tmp_path.glob("*.tmp"))
