"""Every view renders from a saved profile of a tiny model; the report opens in a real headless Chromium."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from attnscope.kernels import AttnStatsSpec
from attnscope.profiler import ProfileError, load, profile
from attnscope.render import summary, views
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main

SPEC = AttnStatsSpec(bins=256, thumb_size=16)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    rng = np.random.default_rng(0)
    model, tok = tiny_model("llama", vocab=200), word_tokenizer()
    root = tmp_path_factory.mktemp("profiles")
    a = profile(
        model, tok, [random_text(40, rng), random_text(25, rng)], spec=SPEC, progress=False, keep_full=[(0, 1), (1, 2)]
    )
    b = profile(model, tok, [random_text(30, rng)], spec=SPEC, progress=False)
    other = profile(tiny_model("gpt2", vocab=200), tok, [random_text(10, rng)], spec=SPEC, progress=False)
    return a.save(root / "critical"), b.save(root / "neutral"), other.save(root / "other")


def _image_ok(path):
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 2000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img[..., :3].std() > 0.01, f"{path} is all one colour"


def test_each_view_renders(run_dirs, tmp_path):
    prof = load(run_dirs[0])
    figs = {
        "heat": views.plot_heatmaps(prof, [(0, 0), (0, 1), (1, 3)], prompt=0),
        "pat_mean": views.plot_patterns(prof, [(0, 0), (1, 1)], mode="mean"),
        "pat_max": views.plot_patterns(prof, [(1, 0)], mode="max", prompt=1),
        "pat_tok": views.plot_patterns(prof, [(0, 1)], mode="token", token=5),
        "pat_final": views.plot_patterns(prof, [(1, 3)], mode="token"),
        "grid": views.plot_layer_grid(prof, [0, 1], head=None),
        "grid_h": views.plot_layer_grid(prof, [1, 0], head=2, prompt=1),
        "down": views.plot_down_proj(prof, prompt=1),
        "cmp": views.plot_compare(prof, load(run_dirs[1]), ("critical", "neutral")),
    }
    for name, fig in figs.items():
        _image_ok(views.save(fig, tmp_path / f"{name}.png"))


def test_layer_grid_shares_one_colour_scale(run_dirs):
    prof = load(run_dirs[0])
    fig = views.plot_layer_grid(prof, [0, 1], head=None)
    clims = {im.get_clim() for ax in fig.axes for im in ax.get_images()}
    assert len(clims) == 1
    vmin, vmax = clims.pop()
    top = max(float(summary.attention_matrix(prof, 0, layer, None)[0].max()) for layer in (0, 1))
    assert vmin == 0 and vmax == pytest.approx(top)


def test_heatmap_uses_kept_full_matrix_else_thumbnail(run_dirs):
    prof = load(run_dirs[0])
    m, full, L = summary.attention_matrix(prof, 0, 0, 1)
    assert full and m.shape == (L, L)
    np.testing.assert_allclose(m.sum(1), np.ones(L), rtol=1e-5)  # rows of p sum to one
    m, full, L = summary.attention_matrix(prof, 0, 0, 0)
    assert not full and m.shape == (16, 16)


def test_patterns_token_row_needs_a_kept_head(run_dirs):
    prof = load(run_dirs[0])
    with pytest.raises(summary.ViewError, match="--keep-head 0:0"):
        summary.received(prof, 0, 0, 0, "token", token=3)
    row = summary.received(prof, 0, 1, 2, "token", token=4)
    assert row[:5].sum() == pytest.approx(1, abs=1e-5) and (row[5:] == 0).all()


def test_compare_refuses_other_models(run_dirs, capsys):
    a, c = load(run_dirs[0]), load(run_dirs[2])
    with pytest.raises(ProfileError, match="different models"):
        views.plot_compare(a, c)
    assert main(["compare", str(run_dirs[0]), str(run_dirs[2])]) == 2
    assert "different models" in capsys.readouterr().err


def test_export_csv(run_dirs, tmp_path):
    assert main(["export", str(run_dirs[0]), "--csv", "--out", str(tmp_path)]) == 0
    prof = load(run_dirs[0])
    with open(tmp_path / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == prof.n_tokens and rows[0]["prompt"] == "0" and "mlp_in_norm_l1" in rows[0]
    with open(tmp_path / "heads.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == prof.n_layers * prof.n_heads
    assert set(rows[0]) == {"layer", "head", *summary.HEAD_COLUMNS}


def test_view_cli_and_errors(run_dirs, tmp_path, capsys):
    d = str(run_dirs[0])
    out = str(tmp_path / "figs")
    for argv in (
        ["heatmap", d, "--heads", "0:0,1:2", "--out", out],
        ["patterns", d, "--heads", "1:1", "--out", out],
        ["grid", d, "--layers", "0,1", "--out", out],
        ["grid", d, "--head", "3", "--out", out],
        ["downproj", d, "--prompt", "1", "--out", out],
        ["render", d, "--plotly", "--out", out],
    ):
        assert main(argv) == 0, (argv, capsys.readouterr().err)
    names = sorted(os.listdir(out))
    assert "down_proj_3d_p1.html" in names and "laminar_all.html" in names and "heatmaps_p0.png" in names
    for argv, msg in [
        (["heatmap", d, "--heads", "5:0"], "layer 5 is out of range"),
        (["heatmap", d, "--heads", "0:9"], "head 9 is out of range"),
        (["patterns", d, "--heads", "0:0", "--mode", "token", "--token", "2"], "--keep-head 0:0"),
        (["grid", d, "--layers", "0,a"], "comma-separated integers"),
        (["downproj", d, "--prompt", "7"], "out of range"),
        (["report", str(tmp_path / "nothing")], "not a profile directory"),
        (["heatmap", str(tmp_path), "--heads", "0:0"], "not a profile directory"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("attnscope: error:") and msg in err, (argv, err)


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
            shell=True,
            capture_output=True,
            timeout=900,
        )
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("headless Chromium is not installed and could not be installed (apt-get install chromium)")
    return exe


CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=8000",
]


def _dump_dom(exe, page, profile_dir):
    """The DOM after scripts ran, and the console messages that reported an error."""
    res = subprocess.run(
        [exe, *CHROME_FLAGS, f"--user-data-dir={profile_dir}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    return res.stdout, errors


def test_report_in_headless_chromium(run_dirs, tmp_path):
    exe = _chromium()
    # the harness sees a console error when there is one
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert _dump_dom(exe, broken, tmp_path / "chrome-check")[1], "console errors are not being captured"

    report = tmp_path / "report.html"
    assert main(["report", str(run_dirs[0]), "--compare", str(run_dirs[1]), "--out", str(report)]) == 0
    text = report.read_text()
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*\shref=", text), "the report must not load anything remotely"
    profile_dir = tmp_path / "chrome-profile"
    dom, errors = _dump_dom(exe, report, profile_dir)
    assert not errors, errors
    assert dom.count('class="plot-container plotly"') >= 4, "plotly figures missing from the DOM"
    assert 'id="heads"' in dom and "<svg" in dom
    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [
            exe,
            *CHROME_FLAGS,
            f"--user-data-dir={profile_dir}",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.is_file(), res.stderr[-2000:]
    _image_ok(shot)


def test_down_proj_by_position(run_dirs):
    prof = load(run_dirs[1])  # one prompt
    L = prof.n_tokens
    np.testing.assert_allclose(summary.down_proj_by_position(prof, "in", bins=L), prof.arrays["mlp.in_norm"])
    two = load(run_dirs[0])  # two prompts of different lengths: each bin averages both prompts' tokens in it
    m = summary.down_proj_by_position(two, "out", bins=4)
    norms, off = two.arrays["mlp.out_norm"], two.offsets
    first = [norms[:, off[p] : off[p + 1]][:, : max(1, (off[p + 1] - off[p]) // 4)] for p in range(2)]
    assert m.shape == (two.n_layers, 4)
    assert np.all(m[:, 0] >= min(f.min() for f in first) - 1e-6) and np.all(m[:, 0] <= max(f.max() for f in first))
