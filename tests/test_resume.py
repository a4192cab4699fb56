"""kill -9 of a real ``attnscope profile`` at random moments, then --resume: equal to an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import random_text

from attnscope.cli import main
from attnscope.profiler import load
from attnscope.profiler.data import ACCUM_NAMES


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def _args(model_dir, corpus, out):
    return [
        "profile",
        str(model_dir),
        "--prompts",
        str(corpus),
        "--out",
        str(out),
        "--bins",
        "64",
        "--thumb-size",
        "8",
        "--top-k",
        "3",
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--keep",
        "tables",
        "--no-progress",
        "--threads",  # bit-equal sums need the same thread count in this process (whatever a test set) and the runs
        "1",
    ]


def _assert_same_run(a_dir, b_dir):
    a, b = load(a_dir), load(b_dir)
    assert [p["id"] for p in a.prompts] == [p["id"] for p in b.prompts]
    present = [n for n in ACCUM_NAMES if n in a.arrays or n in b.arrays]  # a dense model has no expert accumulators
    for name in present + ["tokens.ids", "tokens.logit_entropy", "mlp.in_norm", "mlp.topk_idx"]:
        assert np.array_equal(a.arrays[name], b.arrays[name]), name  # same shards, same sums in the same order
    assert np.array_equal(a.offsets, b.offsets)


def _assert_clean(run_dir):
    """Every file in the run is named by run.json (or is run.json/.lock): no temp file, no uncommitted shard."""
    doc = json.loads((run_dir / "run.json").read_text())
    named = {f for s in doc["shards"] for f in s["files"]} | {doc["accum"]}
    on_disk = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()} - {"run.json", ".lock"}
    assert on_disk == named, on_disk ^ named
    assert doc["status"] == "complete"
    assert not list(run_dir.parent.glob(".*tmp*")) and not list(run_dir.parent.glob(".*old*"))


def _shards(run_dir) -> int:
    try:
        return len(json.loads((run_dir / "run.json").read_text())["shards"])
    except (OSError, ValueError):
        return -1  # not there yet, or caught between write and rename (the rename is atomic: never half a file)


def test_kill9_at_random_moments_then_resume(model_dir, tmp_path, rng, _seed):
    """Each trial kills a subprocess after a random number of committed shards plus a random delay (so the kill
    lands anywhere in the forward, the shard writes or the commit), resumes, and compares to a clean run."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(2, 40, size=40)) + "\n")
    ref = tmp_path / "ref"
    assert main(_args(model_dir, corpus, ref)) == 0
    for trial in range(2):
        out = tmp_path / f"k{trial}"
        kills = []
        for attempt in range(1 + (trial == 1)):  # the last trial kills the resumed run too
            argv = _args(model_dir, corpus, out) + (["--resume"] if attempt else [])
            p = subprocess.Popen([sys.executable, "-m", "attnscope.cli"] + argv, stderr=subprocess.DEVNULL)
            target = int(rng.integers(0, 8)) + (_shards(out) if attempt else 0)
            delay = float(rng.uniform(0, 0.3))
            deadline = time.time() + 120
            while p.poll() is None and _shards(out) < target and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
            p.kill()  # SIGKILL
            p.wait()
            kills.append((target, round(delay, 3)))
        assert main(_args(model_dir, corpus, out) + ["--resume"]) == 0, f"kills {kills}, seed {_seed}"
        _assert_same_run(out, ref)
        _assert_clean(out)


def test_second_writer_is_refused_and_nothing_is_lost(model_dir, tmp_path, rng, capsys):
    """Two real `attnscope profile` processes on one --out: the second gets one line; the first loses nothing."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(random_text(int(k), rng) for k in rng.integers(2, 30, size=120)) + "\n")
    out = tmp_path / "r"
    first = subprocess.Popen(
        [sys.executable, "-m", "attnscope.cli"] + _args(model_dir, corpus, out), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while first.poll() is None and _shards(out) < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the first writer ended before the second could try"
        for extra in (["--append"], ["--resume"], ["--force"]):
            rc = main(_args(model_dir, corpus, out) + extra)
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1 and "is busy" in err[0], err
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()
    prof = load(out)
    assert len(prof.prompts) == 120 and len({p["id"] for p in prof.prompts}) == 120
    _assert_clean(out)
