"""A run's files are trusted only once checked: paths that leave the run, symbolic links, damaged and tampered
files, doubled prompts, ``verify`` and ``repair``; a fuzz test of the readers; Numba's cache outside the package."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_text

from attnscope.cli import main
from attnscope.profiler import load
from attnscope.profiler.data import ProfileError
from attnscope.profiler.store import doc_digest

ARGS = ["--bins", "64", "--thumb-size", "8", "--top-k", "3", "--batch-size", "4", "--no-progress"]


def _profile(model_dir, corpus: Path, out: Path, *extra: str) -> int:
    argv = ["profile", str(model_dir), "--prompts", str(corpus), "--out", str(out), "--shard-size", "3", *ARGS]
    return main(argv + list(extra))


@pytest.fixture(scope="module")
def pristine(tiny_llama_dir, tmp_path_factory):
    """Two small runs of different prompts (the first keeps the vectors tier), made once; tests copy them."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("integrity")
    for name, n in (("a", 7), ("b", 4)):
        corpus = d / f"{name}.txt"
        corpus.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(3, 20, size=n)) + "\n")
        keep = ["--keep", "vectors"] if name == "a" else ["--keep", "tables"]
        assert _profile(tiny_llama_dir, corpus, d / name, *keep) == 0
    return d


@pytest.fixture
def runs(pristine, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(pristine / name, tmp_path / name)
        shutil.copy(pristine / f"{name}.txt", tmp_path / f"{name}.txt")
    return tmp_path


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (what must not change)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != ".lock"
    }


def _edit_manifest(run: Path, edit) -> None:
    """Rewrite run.json as a forger would: the edit, then a digest that matches it (the digest is no secret)."""
    doc = json.loads((run / "run.json").read_text())
    edit(doc)
    doc["digest"] = doc_digest(doc)
    (run / "run.json").write_text(json.dumps(doc, indent=1))


def _one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    line = [e for e in err if e.startswith("attnscope: error:")]
    assert len(line) == 1 and "Traceback" not in "\n".join(err), err
    for w in words:
        assert w in line[0], line[0]
    return line[0]


def _readers(run: Path, tmp: Path) -> list[list[str]]:
    return [
        ["sql", str(run), "select count(*), sum(token_id) from tokens"],
        ["heads", str(run), "--out", str(tmp / "heads")],
        ["merge", str(run), "--out", str(tmp / "merged")],
    ]


# -- paths that leave the run --
ESCAPES = {
    "shard name": lambda d: d["shards"][0].update(
        name="../../SECRET/id_rsa", files=[f.replace("s000000", "../../SECRET/id_rsa") for f in d["shards"][0]["files"]]
    ),
    "file path": lambda d: d["shards"][0]["files"].__setitem__(0, "index/../../OTHER/x.parquet"),
    "absolute path": lambda d: d["shards"][0]["files"].__setitem__(0, "/etc/passwd"),
    "accumulators": lambda d: d.update(accum="../b/accum/a000001.safetensors"),
}


@pytest.mark.parametrize("kind", list(ESCAPES))
def test_a_path_that_leaves_the_run_is_refused(runs, kind, capsys):
    secret = runs / "SECRET"
    secret.mkdir()
    (secret / "id_rsa").write_text("private\n")
    run = runs / "a"
    _edit_manifest(run, ESCAPES[kind])
    before = _tree(runs)
    for argv in _readers(run, runs):
        _one_line_error(capsys, main(argv), "run.json is corrupted or was edited")
    with pytest.raises(ProfileError):
        load(run)
    assert _tree(runs) == before and not (runs / "merged").exists()


def test_a_symlinked_folder_is_never_written_through(runs, capsys):
    outside = runs / "outside"
    outside.mkdir()
    for name in ("keep1.parquet", "keep2.txt"):
        (outside / name).write_text("not the run's\n")
    run = runs / "a"
    shutil.copytree(run / "index", outside, dirs_exist_ok=True)
    shutil.rmtree(run / "index")
    (run / "index").symlink_to(outside)
    before = _tree(outside)
    new = runs / "new.txt"
    new.write_text("a prompt that is not in the run yet\n")
    code = _profile(runs.parent / "none", new, run, "--append")  # refused before the model is even looked for
    _one_line_error(capsys, code, "symbolic link")
    assert _tree(outside) == before
    for argv in _readers(run, runs):
        _one_line_error(capsys, main(argv), "symbolic link")


def test_accumulators_linked_to_dev_zero_are_refused(runs, capsys):
    run = runs / "a"
    accum = run / json.loads((run / "run.json").read_text())["accum"]
    accum.unlink()
    accum.symlink_to("/dev/zero")
    for argv in _readers(run, runs):
        _one_line_error(capsys, main(argv), "symbolic link")


def test_merge_into_one_of_its_inputs_is_refused(runs, capsys):
    before = _tree(runs / "a")
    code = main(["merge", str(runs / "a"), str(runs / "b"), "--out", str(runs / "a"), "--force"])
    _one_line_error(capsys, code, "choose a new --out")
    assert _tree(runs / "a") == before


# -- no prompt twice --
def test_prompts_are_never_doubled(runs, tiny_llama_dir, capsys):
    a = runs / "a"
    before = _tree(a)
    _one_line_error(capsys, _profile(tiny_llama_dir, runs / "a.txt", a, "--append"), "already in the run")
    _one_line_error(capsys, _profile(tiny_llama_dir, runs / "b.txt", a, "--resume"), "is complete", "--append")
    _one_line_error(capsys, main(["merge", str(a), str(a), "--out", str(runs / "aa")]), "is in both")
    assert _tree(a) == before and not (runs / "aa").exists()
    # --skip-existing: the prompts already there are left out, the others are added
    mixed = runs / "mixed.txt"
    mixed.write_text((runs / "a.txt").read_text() + "one prompt more\n")
    assert _profile(tiny_llama_dir, mixed, a, "--append", "--skip-existing") == 0
    doc = json.loads((a / "run.json").read_text())
    assert doc["n_prompts"] == 8
    ids = load(a).prompts
    assert len({p["sha256"] for p in ids}) == 8


# -- damaged and tampered files --
def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_files_are_one_line_errors(runs, capsys):
    run = runs / "a"
    tok = run / "tokens/s000000.parquet"
    _flip(tok, tok.stat().st_size // 2)  # same size, the header still parses
    _one_line_error(capsys, main(["sql", str(run), "select count(*) from tokens"]), "tokens/s000000.parquet")
    vec = run / "vectors/s000001.safetensors"
    _flip(vec, vec.stat().st_size - 10)  # a number of a thumbnail: the header still parses
    _one_line_error(capsys, main(["heatmap", str(run), "--heads", "0:0", "--prompt", "4"]), "s000001", "checksum")
    vec.write_bytes(vec.read_bytes()[:-100])  # truncated
    _one_line_error(capsys, main(["heatmap", str(run), "--heads", "0:0", "--prompt", "4"]), "s000001", "verify")


def test_a_tampered_table_with_a_valid_file_is_refused(runs, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = runs / "a"
    f = run / "tokens/s000000.parquet"
    t = pq.read_table(f)
    t = t.set_column(t.schema.get_field_index("token"), "token", pa.array(["forged"] * t.num_rows))
    pq.write_table(t, f)
    _one_line_error(capsys, main(["sql", str(run), "select token from tokens"]), "tokens/s000000", "cannot be trusted")


def test_verify_and_repair(runs, capsys):
    run = runs / "a"
    assert main(["verify", str(run)]) == 0
    assert "is intact" in capsys.readouterr().out
    mem = load(run)
    means = {k: v.copy() for k, v in mem.head_means().items()}
    _flip(run / "vectors/s000002.safetensors", 4000)
    code = main(["verify", str(run)])
    out = capsys.readouterr().out
    assert code == 2 and "damaged: vectors/s000002.safetensors (shard s000002)" in out, out
    assert main(["repair", str(run), "--drop-bad-shards"]) == 0
    out = capsys.readouterr().out
    assert "dropped the vectors tier" in out and "is intact" in out
    fixed = load(run)
    for k, v in fixed.head_means().items():
        np.testing.assert_array_equal(v, means[k])
    with pytest.raises(ProfileError, match="--keep vectors"):
        np.asarray(fixed.arrays["attn.diag"][0, 0, :3])
    # a damaged table cannot be dropped consistently: repair says why and changes nothing
    _flip(run / "prompts/s000001.parquet", 300)
    before = _tree(run)
    _one_line_error(capsys, main(["repair", str(run), "--drop-bad-shards"]), "cannot be taken apart by shard")
    assert _tree(run) == before


# -- fuzz: random truncations, bit flips and deletions of every kind of file --
def _summary(run: Path) -> dict:
    """Everything a reader gives: numbers of the accumulators, the tables and the vectors tier."""
    prof = load(run)
    out = {k: np.asarray(v).copy() for k, v in prof.head_means().items()}
    out["laminar"] = prof.laminar("all", points=16)[1]
    out["ids"] = np.asarray(prof.arrays["tokens.ids"]).copy()
    out["norm"] = np.asarray(prof.arrays["mlp.in_norm"]).copy()
    out["prompts"] = np.array([p["sha256"] + "".join(p["tokens"]) for p in prof.prompts])
    if prof.meta.get("keep_vectors"):
        out["diag"] = np.asarray(prof.arrays["attn.diag"]).copy()
        out["thumb"] = np.asarray(prof.arrays["attn.thumb.p5"]).copy()
    return out


def _sql(run: Path, capsys) -> str | None:
    code = main(["sql", str(run), "select prompt, sum(token_id), avg(in_norm[1]) from tokens group by 1 order by 1"])
    cap = capsys.readouterr()
    if code != 0:
        _one_line_error_text(cap.err)
        return None
    return cap.out


def _one_line_error_text(err: str) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum(e.startswith("attnscope: error:") for e in lines) == 1, err


def test_fuzz_damaged_runs_are_read_right_or_refused(pristine, tmp_path, capsys, _seed):
    rng = np.random.default_rng(_seed)
    src = pristine / "a"
    want, want_sql = _summary(src), _sql(src, capsys)
    assert want_sql is not None
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p.name != ".lock")
    kinds = {f.split("/")[0] for f in files}
    assert kinds == {"run.json", "accum", "index", "prompts", "tokens", "vectors"}, kinds
    trials = [(f, m) for f in files for m in ("truncate", "flip", "delete")]
    ran = refused = 0
    for i in rng.permutation(len(trials))[:40]:
        rel, how = trials[i]
        run = tmp_path / f"t{i}"
        shutil.copytree(src, run)
        f = run / rel
        size = f.stat().st_size
        if how == "truncate":
            f.write_bytes(f.read_bytes()[: int(rng.integers(0, size))])
        elif how == "flip":
            _flip(f, int(rng.integers(0, size)))
        else:
            f.unlink()
        try:
            got = _summary(run)
        except ProfileError as e:
            assert "\n" not in str(e), str(e)
            refused += 1
        else:  # read without complaint: then every number must be the pristine one
            assert got.keys() == want.keys(), (rel, how)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{rel} {how}: {k}")
        got_sql = _sql(run, capsys)
        assert got_sql in (None, want_sql), (rel, how)
        ran += 1
        shutil.rmtree(run)
    assert ran and refused, (ran, refused)  # most damage must be caught; an untouched read must be right


# -- Numba's cache never lands in the package --
def test_numba_caches_outside_the_package(tmp_path):
    import attnscope.render.kde as kde

    pkg = Path(kde.__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"ATTNSCOPE_CACHE": str(tmp_path)}
    before = set(pkg.rglob("*.nbi"))
    code = (
        "import numpy as np; from attnscope.render.kde import ExactKDE; "
        "print(ExactKDE(np.linspace(0, 1, 9), use_numba=True)([np.random.rand(50)]).sum())"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    assert list((tmp_path / "numba").rglob("*.nbi")), "no Numba index under $ATTNSCOPE_CACHE/numba"
    assert set(pkg.rglob("*.nbi")) == before, "Numba wrote its cache next to the package's source"


# -- a full disk in the middle of a shard --
def test_a_full_disk_mid_shard_loses_nothing_committed(runs, tiny_llama_dir, capsys, monkeypatch):
    import errno

    import attnscope.profiler.store.writer as store

    a = runs / "a"
    before = _tree(a)
    new = runs / "new.txt"
    new.write_text("\n".join(f"new prompt number {i} of the corpus" for i in range(5)) + "\n")
    real, calls = store.write_parquet, []

    def full_disk(table, path):
        calls.append(path)
        if len(calls) == 5:  # the second shard's prompts table: its index is written, the rest is not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(table, path)

    monkeypatch.setattr(store, "write_parquet", full_disk)
    line = _one_line_error(capsys, _profile(tiny_llama_dir, new, a, "--append"), "no space left", "--resume")
    assert str(a) in line
    doc = json.loads((a / "run.json").read_text())
    assert doc["n_prompts"] == 10 and doc["status"] == "running"  # the first new shard is committed
    assert {k: v for k, v in _tree(a).items() if k in before and k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json" and not k.startswith("accum/")
    }
    assert not list(a.rglob("*.tmp"))
    monkeypatch.setattr(store, "write_parquet", real)
    assert _profile(tiny_llama_dir, new, a, "--resume") == 0  # continues the append; nothing twice
    prof = load(a)
    assert len(prof.prompts) == 12 and len({p["sha256"] for p in prof.prompts}) == 12
    # a new run whose first shard fails leaves no directory behind
    calls.clear()
    monkeypatch.setattr(store, "write_parquet", lambda t, p: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    _one_line_error(capsys, _profile(tiny_llama_dir, new, runs / "fresh"), "nothing was committed")
    assert not (runs / "fresh").exists()


# -- a forger's run.json (the digest recomputed), and other ways in --
FORGED = {
    "no accumulators": lambda d: d.update(accum=None, accum_sha256=None),
    "fewer vectors": lambda d: d["meta"].update(vectors=d["meta"]["vectors"][:5]),
    "schema 1 with checksums": lambda d: d.update(schema_version=1),
    "tokens moved between shards": lambda d: (
        d["shards"][0].update(n_tokens=d["shards"][0]["n_tokens"] - 1),
        d["shards"][1].update(n_tokens=d["shards"][1]["n_tokens"] + 1, token0=d["shards"][1]["token0"] - 1),
    ),
}


@pytest.mark.parametrize("kind", list(FORGED))
def test_a_forged_manifest_is_refused_by_readers_and_writers(runs, kind, capsys):
    run = runs / "a"
    _edit_manifest(run, FORGED[kind])
    new = runs / "new.txt"
    new.write_text("a prompt that is not in the run yet\n")
    before = _tree(runs)
    for argv in _readers(run, runs) + [["verify", str(run)], ["repair", str(run)]]:
        if kind == "tokens moved between shards" and argv[0] == "heads":
            continue  # reads the accumulators only, which the forgery leaves right
        _one_line_error(capsys, main(argv))
    # refused before the model is looked for (there is none at this path)
    _one_line_error(capsys, _profile(runs / "no-model", new, run, "--append"))
    assert _tree(runs) == before and not (runs / "merged").exists()


def test_append_to_a_damaged_run_is_refused_before_any_work(runs, capsys):
    run = runs / "a"
    f = run / "tokens/s000001.parquet"
    _flip(f, f.stat().st_size // 2)
    new = runs / "new.txt"
    new.write_text("a prompt that is not in the run yet\n")
    _one_line_error(capsys, _profile(runs / "no-model", new, run, "--append"), "tokens/s000001", "cannot be trusted")


def test_a_repeated_prompt_in_one_corpus_is_refused(runs, tiny_llama_dir, capsys):
    twice = runs / "twice.txt"
    twice.write_text("the same prompt\nanother one\nthe same prompt\n")
    _one_line_error(capsys, _profile(tiny_llama_dir, twice, runs / "t"), "prompt 2 repeats prompt 0", "id")
    assert not (runs / "t").exists()


def test_views_never_write_through_a_link_in_the_run(runs, capsys):
    elsewhere = runs / "elsewhere"
    elsewhere.mkdir()
    (runs / "a" / "figures").symlink_to(elsewhere)
    _one_line_error(capsys, main(["render", str(runs / "a"), "--kinds", "self"]), "symbolic link", "--out")
    assert not list(elsewhere.iterdir())


def test_sql_never_writes_into_another_run(runs, capsys):
    before = _tree(runs / "b")
    code = main(["sql", str(runs / "a"), "select 1 as a", "--out", str(runs / "b" / "run.json")])
    _one_line_error(capsys, code, "lies inside the run")
    assert _tree(runs / "b") == before
