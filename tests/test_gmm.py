"""LFM: the jnp and sklearn GMM backends agree, recover known components, survive bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfcleanse_jax.cleansing import gmm
from selfcleanse_jax.cleansing.gmm import fit_gmm_jax, fit_gmm_sklearn, split_clean_noisy

TRUE_MEANS = (0.2, 0.7)
TRUE_STDS = (0.03, 0.05)
TRUE_WEIGHTS = (0.7, 0.3)


def _flagged(result):
    """The flags of the default tau (0.5): `cleansing.flags` takes the same threshold."""
    return result.clean_prob < 0.5


@pytest.fixture(scope="module")
def mixture() -> tuple[np.ndarray, np.ndarray]:
    """700 clean-like N(0.2, 0.03) and 300 noisy-like N(0.7, 0.05) losses, shuffled."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.2, 0.03, 700), rng.normal(0.7, 0.05, 300)])
    is_noisy = np.r_[np.zeros(700, bool), np.ones(300, bool)]
    perm = rng.permutation(x.size)
    return x[perm], is_noisy[perm]


@pytest.fixture(scope="module")
def fits(mixture) -> dict[str, gmm.GMMFit]:
    x, _ = mixture
    return {
        "jax": jax.device_get(fit_gmm_jax(jnp.asarray(x, jnp.float32))),
        "sklearn": fit_gmm_sklearn(x),
    }


def test_backends_agree(fits):
    a, b = fits["jax"], fits["sklearn"]
    assert not a.degenerate and not b.degenerate
    assert a.converged and b.converged
    np.testing.assert_allclose(a.means, b.means, atol=1e-4)
    np.testing.assert_allclose(a.weights, b.weights, atol=1e-4)
    np.testing.assert_allclose(a.clean_prob, b.clean_prob, atol=1e-3)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-4)


@pytest.mark.parametrize("backend", ["jax", "sklearn"])
def test_recovers_known_components(fits, mixture, backend):
    fit = fits[backend]
    np.testing.assert_allclose(fit.means, TRUE_MEANS, atol=0.01)
    np.testing.assert_allclose(np.sqrt(fit.variances - 5e-4), TRUE_STDS, atol=0.01)
    np.testing.assert_allclose(fit.weights, TRUE_WEIGHTS, atol=0.03)
    _, is_noisy = mixture
    np.testing.assert_array_equal(np.asarray(fit.clean_prob) < 0.5, is_noisy)


@pytest.mark.parametrize("backend", ["jax", "sklearn"])
def test_clean_prob_decreases_with_loss(fits, mixture, backend):
    x, _ = mixture
    w = np.asarray(fits[backend].clean_prob)[np.argsort(x)]
    assert np.all(np.diff(w) <= 1e-6)
    assert w[0] > 0.99 and w[-1] < 0.01


def test_split_is_scale_invariant_and_backends_agree(mixture):
    x, is_noisy = mixture
    results = [
        split_clean_noisy(x, backend="jax"),
        split_clean_noisy(3.0 * x + 1.0, backend="jax"),
        split_clean_noisy(x, backend="sklearn"),
    ]
    for r in results:
        assert r.message == ""
        assert r.clean_prob.dtype == np.float32
        np.testing.assert_array_equal(_flagged(r), is_noisy)
        np.testing.assert_allclose(r.clean_prob, results[0].clean_prob, atol=1e-3)
    assert 0.0 < results[0].fit.means[0] < results[0].fit.means[1] < 1.0  # normalised units


@pytest.mark.parametrize("backend", ["jax", "sklearn"])
def test_highest_losses_stay_noisy_when_the_clean_component_is_wider(backend):
    rng = np.random.default_rng(3)
    clean = rng.normal(0.3, 0.12, 600)
    noisy = rng.normal(0.75, 0.015, 300)
    x = np.concatenate([clean, noisy, [1.3, 1.4]])  # two losses far above both components
    result = split_clean_noisy(x, backend=backend)
    fit = result.fit
    assert fit.variances[0] > fit.variances[1]  # the case this guards against
    raw = np.asarray(fit.clean_prob)
    assert raw[-1] > 0.5 > raw[600 + np.argmin(np.abs(noisy - 0.75))]  # the posterior turns up
    order = np.argsort(x)
    above = order[result.normalised[order] > fit.means[0]]
    assert np.all(np.diff(result.clean_prob[above]) <= 0)
    assert _flagged(result)[-2:].all()
    below = result.normalised <= fit.means[0]
    np.testing.assert_array_equal(result.clean_prob[below], raw[below].astype(np.float32))


DEGENERATE = {
    "constant": np.full(6, 0.37),
    "one": np.array([0.5]),
    "empty": np.array([]),
    "nan": np.array([0.1, np.nan, 0.9, 0.2]),
    "inf": np.array([0.1, np.inf, 0.9, 0.2]),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_marks_all_clean(name):
    x = DEGENERATE[name]
    fits = [fit_gmm_jax(jnp.asarray(x, jnp.float32)), fit_gmm_sklearn(x)]
    for fit in fits:
        assert bool(fit.degenerate)
        np.testing.assert_array_equal(np.asarray(fit.clean_prob), np.ones(x.size))
    assert fits[1].reason
    for backend in ("jax", "sklearn"):
        r = split_clean_noisy(x, backend=backend)
        assert bool(r.fit.degenerate) and r.message
        assert r.clean_prob.shape == x.shape and np.all(r.clean_prob == 1.0)
        assert not _flagged(r).any()


def test_sklearn_failure_is_degenerate(monkeypatch, mixture):
    class Failing:
        def __init__(self, **_):
            pass

        def fit(self, _):
            raise ValueError("ill-defined empirical covariance")

    monkeypatch.setattr(gmm, "GaussianMixture", Failing)
    r = split_clean_noisy(mixture[0], backend="sklearn")
    assert "ill-defined" in r.message and not _flagged(r).any()


def test_valid_mask_excludes_entries(mixture, fits):
    x, _ = mixture
    padded = np.concatenate([x, [np.nan, 1e6, -3.0]])
    valid = np.r_[np.ones(x.size, bool), np.zeros(3, bool)]
    a = jax.device_get(jax.jit(fit_gmm_jax)(jnp.asarray(padded, jnp.float32), jnp.asarray(valid)))
    b = fit_gmm_sklearn(padded, valid)
    for fit, ref in ((a, fits["jax"]), (b, fits["sklearn"])):
        assert not fit.degenerate
        np.testing.assert_allclose(fit.means, ref.means, atol=1e-5)
        np.testing.assert_allclose(fit.clean_prob[: x.size], ref.clean_prob, atol=1e-5)
        np.testing.assert_array_equal(fit.clean_prob[x.size :], 1.0)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        split_clean_noisy(np.ones(3), backend="torch")


def _clean_and_noisy_losses() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0.3, 0.05, 900), rng.normal(0.8, 0.08, 100)])
    return x, np.r_[np.zeros(900, bool), np.ones(100, bool)]


def test_robust_input_is_unmoved_by_one_extreme_loss():
    x, is_noisy = _clean_and_noisy_losses()
    plain = split_clean_noisy(x, normalise="quantile")
    assert np.mean(_flagged(plain) == is_noisy) > 0.97
    with_outlier = np.r_[x, 25.0]
    robust = split_clean_noisy(with_outlier, normalise="quantile")
    np.testing.assert_array_equal(_flagged(robust)[:-1], _flagged(plain))
    assert _flagged(robust)[-1]
    assert robust.normalised.max() == 1.0 and robust.normalised[-1] == 1.0
    # Min-max lets the one extreme loss hide every noisy slice.
    minmax = split_clean_noisy(with_outlier, normalise="minmax")
    assert _flagged(minmax)[:-1].sum() < 10


def test_quantile_normalisation_falls_back_to_minmax_where_quantiles_meet():
    x = np.r_[np.zeros(200), 1.0, 2.0]
    np.testing.assert_allclose(gmm.normalise_losses(x, "quantile"), x / 2.0)
    with pytest.raises(ValueError, match="normalisation"):
        split_clean_noisy(x, normalise="rank")


def test_separation_tells_two_groups_from_one():
    x, _ = _clean_and_noisy_losses()
    assert gmm.separation(split_clean_noisy(x).fit) > 4
    one_group = np.random.default_rng(0).normal(0.5, 0.1, 1000)
    assert gmm.separation(split_clean_noisy(one_group).fit) < 2
    assert np.isnan(gmm.separation(split_clean_noisy(np.ones(5)).fit))
