"""Every view renders from a saved profile of a tiny model; the report opens in a real headless Chromium."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main
from attnscope.kernels import AttnStatsSpec
from attnscope.profiler import ProfileError, load, profile
from attnscope.render import summary, views

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
    # each panel has a strip of the exact sink mass p(i, 0) per query, on the same scale
    sink = prof.arrays["attn.sink"][:2, :, prof.prompt_slice(0)].mean(1)  # [2 layers, L]
    top = max(top, float(sink.max()))
    strips = [im for ax in fig.axes for child in ax.child_axes for im in child.get_images()]
    assert len(strips) == 2 and {im.get_clim() for im in strips} == {(vmin, vmax)}
    assert 0 < vmin < vmax and vmax == pytest.approx(top)  # log colour: the floor is stated on the colourbar
    (label,) = {ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"}
    assert "log colour" in label
    fig = views.plot_layer_grid(prof, [0, 1], head=None, scale="linear")
    ((lo, hi),) = {im.get_clim() for ax in fig.axes for im in ax.get_images()}
    assert lo == 0 and hi == pytest.approx(top)


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
    assert dom.count('class="plot-container plotly"') >= 5, "plotly figures missing from the DOM"
    assert 'id="heads"' in dom and "<svg" in dom
    for sid in re.findall(r'<a href="#([\w-]+)">', dom):  # every entry of the contents leads to a section
        assert f'<section id="{sid}">' in dom, sid
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


# -- every figure shows structure: no single colour covers most of a data panel --


def one_colour_shares(fig) -> list[float]:
    """Per data panel (not colourbars): the share of its pixels inside the frame taken by its commonest colour."""
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    height = buf.shape[0]
    shares = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>" or not ax.axison:
            continue
        bb = ax.get_window_extent()
        px = buf[height - int(bb.y1) + 2 : height - int(bb.y0) - 2, int(bb.x0) + 2 : int(bb.x1) - 2].reshape(-1, 3)
        _, counts = np.unique(px, axis=0, return_counts=True)
        shares.append(counts.max() / counts.sum())
    assert shares, "no data panel found"
    return shares


def assert_shows_structure(fig, name, limit=0.85):
    shares = one_colour_shares(fig)
    assert max(shares) <= limit, f"{name}: one colour covers {max(shares):.0%} of a panel (shares {shares})"


def test_structure_check_fails_on_a_linear_heavy_tailed_heatmap(rng):
    # today's laminar figure in miniature: a density ~1000 near p = 0 and ~0.1 elsewhere, on a linear scale
    import matplotlib.pyplot as plt

    dens = rng.uniform(0.01, 0.2, size=(30, 300))
    dens[:, :3] = 900.0
    fig, ax = plt.subplots()
    ax.imshow(dens.T, origin="lower", aspect="auto", cmap="magma")
    with pytest.raises(AssertionError, match="one colour covers"):
        assert_shows_structure(fig, "linear laminar")
    fig, ax = plt.subplots()
    ax.imshow(np.log10(dens.T), origin="lower", aspect="auto", cmap="magma")
    assert_shows_structure(fig, "log laminar")


@pytest.mark.parametrize("kind", ["self", "final", "all", "log"])
def test_laminar_shows_structure(run_dirs, kind):
    from attnscope.render.laminar import LaminarRenderer

    prof = load(run_dirs[0])
    for scale in ("log", "layer"):
        r = LaminarRenderer(kinds=[kind], scale=scale)
        fig = r._figure(prof, kind)
        assert_shows_structure(fig, f"laminar {kind} {scale}")
        labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(labels) == 1 and ("log colour" in labels[0] or "per-layer" in labels[0])
        heads = r._heads_figure(prof, kind)
        assert_shows_structure(heads, f"laminar {kind} per head")
        assert sum(ax.get_label() == "<colorbar>" for ax in heads.axes) == 1  # one shared scale for the heads


def test_views_show_structure(run_dirs):
    prof = load(run_dirs[0])
    figs = {
        "heatmaps": views.plot_heatmaps(prof, [(0, 0), (0, 1), (1, 3)]),
        "patterns": views.plot_patterns(prof, [(0, 0), (1, 1)], mode="mean"),
        "patterns max": views.plot_patterns(prof, [(1, 0)], mode="max", prompt=1),
        "grid": views.plot_layer_grid(prof, [0, 1]),
        "down_proj": views.plot_down_proj(prof),
        "compare": views.plot_compare(prof, load(run_dirs[1]), ("critical", "neutral")),
    }
    cmp = figs.pop("compare")
    # the per-head statistics' differences may be a uniform shift (one colour, honestly): the other panels may not.
    # 0.9 here: profile B is one prompt of 30 tokens, 120 final-row weights a layer, and the weight axis is shared
    # with A's, so most of B's final-row panel honestly holds no weight at all
    assert max(one_colour_shares(cmp)[:18]) <= 0.9
    for name, fig in figs.items():
        assert_shows_structure(fig, name)
        n_images = sum(bool(ax.get_images()) for ax in fig.axes if ax.get_label() != "<colorbar>")
        n_bars = sum(ax.get_label() == "<colorbar>" for ax in fig.axes)
        assert n_images == 0 or n_bars >= 1, f"{name}: no colourbar"


def test_heatmap_token_text_on_axes(run_dirs):
    prof = load(run_dirs[1])  # 30 tokens: every label fits
    fig = views.plot_heatmaps(prof, [(0, 0)])
    ax = fig.axes[0]
    tokens = summary.token_labels(prof, 0)
    assert [t.get_text() for t in ax.get_xticklabels()] == [views._token_text(t) for t in tokens]
    fig = views.plot_down_proj(prof)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [views._token_text(t) for t in tokens]


def test_patterns_width_is_bounded(run_dirs, tmp_path):
    import matplotlib.image as mpimg

    prof = load(run_dirs[0])
    path = views.save(views.plot_patterns(prof, [(0, 0)]), tmp_path / "p.png")
    assert mpimg.imread(path).shape[1] <= 1400


def test_compare_differences_are_symmetric_and_robust(run_dirs):
    a, b = load(run_dirs[0]), load(run_dirs[1])
    fig = views.plot_compare(a, b, ("A", "B"))
    diffs = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and " - " in ax.get_title()]
    assert len(diffs) == 10
    for ax in diffs:
        lo, hi = ax.get_images()[0].get_clim()
        assert lo == pytest.approx(-hi) and hi > 0


def test_log_kind_comes_from_hist_log(run_dirs):
    from attnscope.render.laminar import laminar_data

    prof = load(run_dirs[0])
    y, frac, *_ = laminar_data(prof, "log")
    np.testing.assert_allclose(frac.sum(1), 1.0, rtol=1e-12)  # every pair counted once per layer
    assert frac.shape == (prof.n_layers, y.size) and np.all(np.diff(y) > 0) and y[-1] < 0
    h = prof.arrays["attn.hist_log"][:, 1].astype(np.float64)
    _, frac1, *_ = laminar_data(prof, "log", head=1)
    assert frac1.sum() == pytest.approx(prof.n_layers) and np.all(h.sum(1) > 0)


def test_plotly_laminar_is_log_coloured(run_dirs):
    pytest.importorskip("plotly")
    from attnscope.render.interactive import laminar_figure

    prof = load(run_dirs[0])
    for kind in ("self", "final", "all", "log"):
        trace = laminar_figure(prof, kind).data[0]
        z = np.asarray(trace.z, dtype=np.float64)
        _, counts = np.unique(z, return_counts=True)
        assert counts.max() / z.size <= 0.85, kind
        assert "log10" in trace.colorbar.title.text


# -- messages: one line, exit code 2, no traceback --


def _one_error_line(capsys, *parts):
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("attnscope: ") for line in lines), lines  # no traceback, no source lines
    err = [line for line in lines if line.startswith("attnscope: error:")]
    assert len(err) == 1, lines
    for p in parts:
        assert p in err[0], (p, err[0])
    return err[0]


def test_heads_message_names_the_option(run_dirs, capsys):
    assert main(["heatmap", str(run_dirs[0]), "--heads=-1:0"]) == 2
    line = _one_error_line(capsys, "--heads", "'-1:0'")
    assert "--keep-head" not in line
    assert main(["patterns", str(run_dirs[0]), "--heads", "0:x"]) == 2
    _one_error_line(capsys, "--heads")


@pytest.mark.parametrize("command", ["heatmap", "grid", "downproj"])
def test_negative_mark_top_is_refused(run_dirs, capsys, command, tmp_path):
    extra = ["--heads", "0:0"] if command == "heatmap" else []
    assert main([command, str(run_dirs[0]), *extra, "--mark-top", "-3", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "--mark-top", "-3")
    assert not any(tmp_path.iterdir())


def _drop_array(src, dst, name):
    import json

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    arrays = load_file(str(dst / "profile.safetensors"))
    del arrays[name]
    save_file(arrays, str(dst / "profile.safetensors"))
    meta = json.loads((dst / "profile.json").read_text())
    meta["arrays_sha256"] = hashlib.sha256((dst / "profile.safetensors").read_bytes()).hexdigest()
    (dst / "profile.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("name", ["attn.dist", "mlp.in_norm", "attn.hist_log"])
def test_profile_missing_an_array(run_dirs, tmp_path, capsys, name):
    bad = _drop_array(run_dirs[0], tmp_path / "bad", name)
    good = str(run_dirs[1])
    for argv in (
        ["report", str(bad), "--out", str(tmp_path / "r.html")],
        ["report", good, "--compare", str(bad), "--out", str(tmp_path / "r.html")],
        ["compare", str(bad), good, "--out", str(tmp_path / "c.png")],
        ["export", str(bad), "--out", str(tmp_path / "t")],
        ["render", str(bad), "--out", str(tmp_path / "f")],
    ):
        reads = {"render": name == "attn.hist_log", "export": name != "attn.hist_log"}.get(argv[0], True)
        rc = main(argv)
        if not reads:  # this view does not read that array
            assert rc == 0, argv
            capsys.readouterr()
            continue
        assert rc == 2, argv
        _one_error_line(capsys, "has no array", repr(name), "profile again")


def test_kde_warnings_are_one_clean_line_each(run_dirs, tmp_path, capsys):
    # 256 bins and a tiny model's broad weights: the KDE warns that its bandwidth is under 3 bins
    assert main(["render", str(run_dirs[0]), "--kinds", "all", "--per-head", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("attnscope: warning: laminar all") for line in err), err
    assert len(err) == len(set(err)) <= 2


def test_report_compare_writes_its_own_file_with_every_section_explained(run_dirs, tmp_path):
    a = shutil.copytree(run_dirs[0], tmp_path / "critical")
    assert main(["report", str(a)]) == 0
    plain = (a / "report.html").read_bytes()
    assert main(["report", str(a), "--compare", str(run_dirs[1])]) == 0
    assert (a / "report.html").read_bytes() == plain
    text = (a / "report_vs_neutral.html").read_text()
    assert "Comparison: critical vs neutral" in text
    links = re.findall(r'<a href="#([\w-]+)">', text)
    assert links == ["model", "laminar", "grid", "heads", "roles", "downproj", "entropy", "compare"]
    for sid in links:
        how = rf'<section id="{sid}"><h2>[^<]+</h2><p class="how"><b>How to read this.</b> [^<]{{20,}}'
        assert re.search(how, text), sid
    assert "compare" not in re.findall(r'<a href="#([\w-]+)">', plain.decode())
