"""KDE estimators against scipy.stats.gaussian_kde."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.render.kde import HAS_NUMBA, BinnedKDE, ExactKDE, KDEWarning

scipy_stats = pytest.importorskip("scipy.stats")

GRID = np.linspace(0, 1, 300)
IMPLS = [
    pytest.param(True, id="numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")),
    pytest.param(False, id="numpy"),
]


def _attention_like(rng, n):
    # mostly small weights, a tail towards 1 (a beta distribution), like softmax outputs
    return rng.beta(0.3, 4.0, size=n)


@pytest.mark.parametrize("use_numba", IMPLS)
@pytest.mark.parametrize("n", [2, 17, 1000, 20000])
def test_exact_kde_equals_scipy(use_numba, n, rng):
    sets = [_attention_like(rng, n), rng.uniform(0.2, 0.4, size=n), rng.normal(0.5, 0.01, size=n)]
    dens = ExactKDE(GRID, use_numba=use_numba)(sets)
    for s, d in zip(sets, dens):
        kde = scipy_stats.gaussian_kde(s)
        ref = kde(GRID)
        # the absolute scale is one sample's kernel peak: with two close samples the bandwidth is far below the grid
        # step, the density on the grid is ~1e-29 and the 12-bandwidth cut (error e^-72 of that peak) shows there
        peak = 1.0 / (len(s) * np.sqrt(2 * np.pi * kde.covariance[0, 0]))
        np.testing.assert_allclose(d, ref, rtol=1e-10, atol=1e-12 * max(ref.max(), peak))


@pytest.mark.parametrize("use_numba", IMPLS)
def test_exact_kde_integrates_to_one(use_numba, rng):
    wide = np.linspace(-1, 2, 3001)
    (d,) = ExactKDE(wide, use_numba=use_numba)([_attention_like(rng, 5000)])
    assert np.trapezoid(d, wide) == pytest.approx(1, abs=1e-5)


def test_exact_kde_degenerate_inputs_warn():
    with pytest.warns(KDEWarning, match="no samples"):
        d = ExactKDE(GRID)([np.zeros(0)])
    assert (d == 0).all()
    with pytest.warns(KDEWarning, match="without spread"):
        d = ExactKDE(GRID)([np.full(10, 0.5)])
    assert np.isfinite(d).all() and d.max() > 0


@pytest.mark.parametrize("bins", [1024, 4096])
def test_binned_kde_close_to_scipy(bins, rng):
    x = _attention_like(rng, 50000)
    hist = np.bincount(np.minimum((x * bins).astype(int), bins - 1), minlength=bins)
    mom = np.array([x.size, x.sum(), (x * x).sum()])
    kde = BinnedKDE(GRID)
    (d,) = kde(hist[None], mom[None])
    ref = scipy_stats.gaussian_kde(x)(GRID)
    assert np.abs(d - ref).max() <= 1e-2 * ref.max()
    assert np.abs(d - ref).max() <= kde.error_bounds[0]  # the stated bound holds
    assert kde.bandwidths[0] == pytest.approx(np.std(x, ddof=1) * x.size**-0.2, rel=1e-9)


def test_binned_kde_warns_when_bandwidth_is_a_few_bins(rng):
    x = rng.normal(0.5, 1e-4, size=100000)
    bins = 256
    hist = np.bincount(np.clip((x * bins).astype(int), 0, bins - 1), minlength=bins)
    with pytest.warns(KDEWarning, match="log10 histogram"):
        BinnedKDE(GRID)(hist[None], np.array([[x.size, x.sum(), (x * x).sum()]]))
