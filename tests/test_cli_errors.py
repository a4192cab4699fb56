"""Errors that once reached the user as tracebacks or passed silently: each is now one exact line and exit code 2."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from helpers import random_text

from attnscope.cli import main
from attnscope.profiler import load


@pytest.fixture(scope="module")
def model_dir(tiny_llama64_dir):
    return tiny_llama64_dir


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    words = "the cat sat on the mat and the dog ran to the cat".split()
    argv = ["profile", str(model_dir), "--out", str(out), "--bins", "64", "--thumb-size", "8", "--no-progress"]
    for k in (12, 9):
        argv += ["--prompt", " ".join(words[:k])]
    assert main(argv) == 0
    return out


def _error(capsys, argv) -> str:
    """Run ``argv``: it must fail with exit code 2 and one ``attnscope: error:`` line, no traceback; the line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnscope: error: "), err
    return lines[0].removeprefix("attnscope: error: ")


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


# -- views on a run they cannot write to --

VIEWS = {  # command -> (extra arguments, where it writes by default, what it writes)
    "render": ([], "figures", "the figures"),
    "heatmap": (["--heads", "0:0"], "figures", "the figures"),
    "grid": ([], "figures", "the figures"),
    "heads": ([], "figures", "the head-role table and figure"),
    "export": ([], "tables", "the tables"),
    "report": ([], "report.html", "the report"),
}


@pytest.fixture
def readonly_run(run_dir, tmp_path, monkeypatch):
    """A copy of the run that cannot be written: read-only for real, or, for root (who may write anyway), as
    ``os.access`` reports a read-only filesystem."""
    ro = shutil.copytree(run_dir, tmp_path / "ro")
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    real = os.access

    def access(path, mode, *args, **kwargs):
        inside = os.path.abspath(path) == str(ro) or os.path.abspath(path).startswith(f"{ro}{os.sep}")
        return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    yield ro


@pytest.mark.parametrize("command", list(VIEWS))
def test_view_on_a_read_only_run_says_where_and_what_to_do(readonly_run, tmp_path, capsys, command):
    extra, sub, what = VIEWS[command]
    before = _tree(readonly_run)
    target = readonly_run / sub
    line = _error(capsys, [command, str(readonly_run), *extra])
    option = "--out FILE" if command == "report" else "--out DIR"
    assert line == f"cannot write {what} to {target}: {readonly_run} is read-only; {option} writes {what} elsewhere"
    assert _tree(readonly_run) == before
    # the way out it names works, and a chosen --out that cannot be written says to choose another
    out = tmp_path / ("elsewhere.html" if command == "report" else "elsewhere")
    assert main([command, str(readonly_run), *extra, "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    inner = readonly_run / "x.html" if command == "report" else readonly_run / "x"
    line = _error(capsys, [command, str(readonly_run), *extra, "--out", str(inner)])
    assert line.endswith(f"{readonly_run} is read-only; choose another --out")


def test_figures_path_taken_by_a_file(run_dir, tmp_path, capsys):
    run = shutil.copytree(run_dir, tmp_path / "r")
    (run / "figures").write_text("not a directory")
    line = _error(capsys, ["render", str(run)])
    assert line == (
        f"cannot write the figures to {run / 'figures'}: {run / 'figures'} is a file, not a directory; "
        "--out DIR writes the figures elsewhere"
    )


def test_write_error_past_the_checks_names_the_file(run_dir, tmp_path, capsys, monkeypatch):
    import attnscope.render.export as export

    def full(table, path, fmt):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".csv")

    monkeypatch.setattr(export, "write_table", full)
    out = tmp_path / "t"
    assert (
        _error(capsys, ["export", str(run_dir), "--out", str(out)]) == f"{out / 'tokens.csv'}: No space left on device"
    )


# -- a directory that is not a run: say what is wrong with it --


def test_not_a_run_says_what_is_wrong(run_dir, tmp_path, capsys):
    no_manifest = shutil.copytree(run_dir, tmp_path / "gone")
    (no_manifest / "run.json").unlink()
    assert _error(capsys, ["render", str(no_manifest)]) == (
        f"{no_manifest} is not a profile directory: it has a run's folders (accum/, index/, prompts/, spans/, tokens/, "
        "vectors/) but no run.json (the run never committed a shard, or its run.json was removed), so none of it "
        "can be read; profile again into a new --out"
    )
    parent = run_dir.parent
    assert _error(capsys, ["render", str(parent)]) == (
        f"{parent} is not a profile directory but holds runs (run): give one of them"
    )
    (tmp_path / "empty").mkdir()
    assert (
        _error(capsys, ["heads", str(tmp_path / "empty")])
        == f"{tmp_path / 'empty'} is not a profile directory: it is empty"
    )
    half = tmp_path / "half"
    half.mkdir()
    (half / "profile.json").write_text("{}")
    assert _error(capsys, ["report", str(half)]) == (
        f"{half} is an incomplete profile: it has profile.json but no profile.safetensors; profile again"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert _error(capsys, ["export", str(tmp_path / "other")]) == (
        f"{tmp_path / 'other'} is not a profile directory: it holds no run.json (a run) and no profile.json with "
        "profile.safetensors (a profile)"
    )


# -- grid --layers: no silent default, no layer drawn twice --


@pytest.mark.parametrize(
    "layers, message",
    [
        ("", "--layers is empty: give comma-separated integers"),
        (",", "--layers is empty: give comma-separated integers"),
        ("0,0,0", "--layers names 0 more than once: give each once"),
        ("1,0,1,0", "--layers names 0, 1 more than once: give each once"),
    ],
)
def test_grid_layers_empty_or_repeated(run_dir, tmp_path, capsys, layers, message):
    assert _error(capsys, ["grid", str(run_dir), "--layers", layers, "--out", str(tmp_path)]) == message
    assert not any(tmp_path.iterdir())


def test_grid_head_takes_one(run_dir, tmp_path, capsys):
    assert _error(capsys, ["grid", str(run_dir), "--head", "0,1", "--out", str(tmp_path)]) == (
        "--head takes one head or 'mean', got '0,1'"
    )


# -- profile: CSV corpora, NUL characters, a full disk, a truncated GGUF --


def test_profile_csv_corpus(model_dir, tmp_path, capsys):
    c = tmp_path / "corpus.csv"
    c.write_text('id,text\na,"the cat sat, on the mat"\nb,the dog ran\n')
    out = tmp_path / "r"
    assert (
        main(["profile", str(model_dir), "--prompts", str(c), "--out", str(out), "--bins", "64", "--no-progress"]) == 0
    )
    prof = load(out)
    assert [p["preview"] for p in prof.prompts] == ["the cat sat, on the mat", "the dog ran"]  # no header prompt
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt\nthe cat\n")
    assert _error(capsys, ["profile", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "n")]) == (
        f"{bad} has no column 'text' (its first line names the columns: prompt); --text-column"
    )
    bad.write_text("text,id\nthe cat,1\nthe dog,2,3\n")
    assert _error(capsys, ["profile", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "n")]) == (
        f"{bad}:3: expected 2 fields (the header's), got 3"
    )
    assert not (tmp_path / "n").exists()


def test_profile_refuses_a_nul_character(model_dir, tmp_path, capsys):
    f = tmp_path / "c.txt"
    f.write_text("the cat\nthe\x00dog\n")
    assert _error(capsys, ["profile", str(model_dir), "--prompts", str(f), "--out", str(tmp_path / "n")]) == (
        f"{f}:2: the prompt holds a NUL character (\\x00): binary data, not text"
    )
    assert not (tmp_path / "n").exists()


def _full_disk_after(monkeypatch, shards: int):
    """Every shard after the first ``shards`` fails as a full disk does (errno 28, no file name)."""
    import sys

    from attnscope.profiler.store import RunWriter

    store = sys.modules[RunWriter.__module__]  # where RunWriter.commit finds write_shard_files
    real, calls = store.write_shard_files, []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) > shards:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "write_shard_files", write)


def test_disk_full_names_the_run_and_resume(model_dir, tmp_path, capsys, monkeypatch, rng):
    out = tmp_path / "r"
    argv = ["profile", str(model_dir), "--out", str(out), "--bins", "64", "--shard-size", "1", "--no-progress"]
    argv += [a for k in (5, 7, 6) for a in ("--prompt", random_text(k, rng))]
    with monkeypatch.context() as m:
        _full_disk_after(m, 1)
        assert _error(capsys, argv) == (
            f"no space left on the device of the run directory {out}: 1 prompt(s) are committed; free space, then "
            "the same command with --resume continues"
        )
    assert len(load(out).prompts) == 1
    assert main(argv + ["--resume"]) == 0, capsys.readouterr().err
    assert len(load(out).prompts) == 3
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        _full_disk_after(m, 0)
        assert _error(capsys, [*argv[:3], str(fresh), *argv[4:]]) == (
            f"no space left on the device of the run directory {fresh}: nothing was committed; free space and "
            "profile again"
        )
    assert not fresh.exists()


def test_truncated_gguf_header(tmp_path, capsys):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00" + (5).to_bytes(8, "little"))  # version 3, then the file ends
    assert _error(capsys, ["profile", str(g), "--prompt", "a cat", "--out", str(tmp_path / "o")]) == (
        f"GGUF file {g} is truncated: it ends at byte 16, inside its header; fetch it again"
    )
    assert not (tmp_path / "o").exists()


def test_truncated_gguf_data(smollm2, tmp_path, capsys):
    pytest.importorskip("transformers.integrations.gguf.reader")
    from attnscope.profiler.models import _GGUF_NAME, cache_dir

    src = cache_dir() / "smollm2" / _GGUF_NAME
    if not src.is_file():
        pytest.skip(f"{src} is not in the cache")
    g = tmp_path / "half.gguf"
    with open(src, "rb") as f:
        g.write_bytes(f.read(50_000_000))
    line = _error(capsys, ["profile", str(g), "--prompt", "a cat", "--out", str(tmp_path / "o")])
    assert line == f"GGUF file {g} is truncated: 50,000,000 of its {src.stat().st_size:,} bytes; fetch it again"


# -- the load shows one progress bar, ours --


def test_loading_shows_no_progress_bar_of_transformers(model_dir, capfd):
    from transformers.utils import logging as tf_logging

    from attnscope.profiler.models import load_model

    assert tf_logging.is_progress_bar_enabled()
    load_model(str(model_dir), device="cpu")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err
    assert tf_logging.is_progress_bar_enabled()  # switched back on afterwards
