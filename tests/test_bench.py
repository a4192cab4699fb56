"""``attnscope bench`` end to end on a tiny saved model: real subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def test_bench_cli_writes_json_and_plot(model_dir, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "attnscope.cli", "bench", str(model_dir), "--lengths", "24", "--repeats", "2"]
    res = subprocess.run(cmd + ["--device", "cpu", "--threads", "1", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "profile / forward" in res.stdout
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 1000
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"] and result["machine"]["torch"]
    assert result["machine"]["cpu_capability"] and isinstance(result["machine"]["cpu_flags"], list)
    assert result["model"]["n_layers"] == 2 and result["memory_metric"] == "peak RSS of the process"
    assert [r["tokens"] for r in result["runs"]] == [24]
    for row in result["runs"]:
        for mode in ("forward", "profile", "eager"):
            r = row[mode]
            assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["burn_in_s"] > 0, (mode, r)
            assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
        assert row["forward"]["tokens"] == row["tokens"]
        assert row["profile"]["tokens"] >= row["tokens"]  # the profile may add the tokenizer's special tokens
        assert row["time_ratio_profile_over_forward"] > 0


def test_eager_skipped_where_predicted_not_to_fit(model_dir, monkeypatch):
    from attnscope.profiler import bench

    geom = {"n_heads": 32, "n_layers": 32}
    # Pythia-2.8B geometry at 32k tokens: the attention matrices alone are 32 * 32 * 32768^2 * 2 bytes = 2 TiB
    assert bench.predict_eager_bytes(geom, 2_800_000_000, 50304, 32768, 2) > 2 * 2**40
    # the forward measured first supplies the geometry; with (said to be) 10 kB free, eager is skipped, not run
    monkeypatch.setattr(bench, "_available_memory", lambda device: 10_000)
    monkeypatch.setattr(bench, "MODES", ("forward", "eager"))
    cfg = bench.BenchConfig(model=str(model_dir), lengths=[8], device="cpu", repeats=1)
    result = bench.run_bench(cfg, log=lambda msg: None)
    row = result["runs"][0]
    assert row["forward"]["median_s"] > 0 and result["model"]["n_layers"] == 2
    assert "more than the" in row["eager"]["skipped"] and row["eager_predicted_bytes"] > 10_000
    with pytest.raises(ValueError, match="lengths"):
        bench.BenchConfig(lengths=[])


def test_bench_cli_names_a_model_it_cannot_load(tmp_path):
    cmd = [sys.executable, "-m", "attnscope.cli", "bench", str(tmp_path / "nothing"), "--lengths", "8", "--no-eager"]
    res = subprocess.run(cmd + ["--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 2 and "plain forward" in res.stderr and "does not exist" in res.stderr, res.stderr
