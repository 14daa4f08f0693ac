"""Label filtering module (LFM): a two-component 1-D Gaussian mixture over per-sample losses.

Samples whose loss falls in the lower-mean component are likely clean; the posterior of that
component is the clean probability w_i. Two backends give the same fit:

- `fit_gmm_jax`: EM in jnp (float32) under `jax.jit`, so it runs on device and inside other
  jitted code; a `valid` mask excludes padded entries.
- `fit_gmm_sklearn`: `sklearn.mixture.GaussianMixture` on host (float64).

Degenerate input (fewer than 2 samples, any NaN/inf, all values equal) never raises: the fit is
marked `degenerate` and every sample gets clean probability 1. `split_clean_noisy` is the host
entry point the training loop calls; it normalises the losses (min-max, or robustly by
quantiles), fits, thresholds and writes a log message when the input was degenerate.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from numpy.typing import ArrayLike
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

_LOG_2PI = math.log(2.0 * math.pi)
_EPS32 = float(np.finfo(np.float32).eps)
_KMEANS_ITERS = 10
BACKENDS = ("jax", "sklearn")


@struct.dataclass
class GMMFit:
    """A fitted two-component 1-D mixture; component 0 is the clean (lower-mean) one.

    Arrays are jax arrays from `fit_gmm_jax` and numpy arrays from the host-side functions.
    `log_likelihood` is the mean log-likelihood per valid sample under the returned parameters
    (NaN when degenerate). `reason` says why the fit is degenerate; only host-side results
    fill it (`fit_gmm_sklearn`, `split_clean_noisy`).
    """

    means: jax.Array | np.ndarray  # (2,) ascending
    variances: jax.Array | np.ndarray  # (2,), reg_covar included
    weights: jax.Array | np.ndarray  # (2,)
    clean_prob: jax.Array | np.ndarray  # (N,); 1 for masked-out entries
    log_likelihood: jax.Array | np.ndarray  # scalar
    n_iter: jax.Array | np.ndarray  # scalar int, EM iterations run
    converged: jax.Array | np.ndarray  # scalar bool, |delta mean log-likelihood| < tol
    degenerate: jax.Array | np.ndarray  # scalar bool
    reason: str = struct.field(pytree_node=False, default="")


@dataclasses.dataclass
class FilterResult:
    """LFM output for one round: clean probability, the fit and a log message.

    The fit's means and variances are in min-max normalised loss units. `message` is empty
    unless the input was degenerate, in which case every sample is marked clean.
    """

    clean_prob: np.ndarray  # (N,) float32
    fit: GMMFit
    normalised: np.ndarray  # (N,) float32, the losses the mixture was fitted on; NaN if degenerate
    message: str = ""


# ----------------------------------------------------------------------------- jax backend


def _masked_quantile(sorted_x: jax.Array, n: jax.Array, q: float) -> jax.Array:
    """Linear-interpolation quantile of the first `n` entries of an ascending array."""
    pos = q * (n - 1).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = pos - lo.astype(jnp.float32)
    return sorted_x[lo] * (1.0 - frac) + sorted_x[hi] * frac


def _kmeans_split(z: jax.Array, mask: jax.Array, n: jax.Array) -> jax.Array:
    """Hard initial responsibilities (2, N) from 1-D two-means started at the quartiles.

    Deterministic stand-in for sklearn's k-means init. Falls back to min/max starting centres
    when the quartiles coincide, so both clusters are non-empty for non-constant data.
    """
    sorted_z = jnp.sort(jnp.where(mask, z, jnp.inf))
    q25 = _masked_quantile(sorted_z, n, 0.25)
    q75 = _masked_quantile(sorted_z, n, 0.75)
    zmin = sorted_z[0]
    zmax = sorted_z[jnp.maximum(n - 1, 0)]
    spread = q75 > q25
    centres = jnp.stack([jnp.where(spread, q25, zmin), jnp.where(spread, q75, zmax)])

    def upper_of(c: jax.Array) -> jax.Array:
        return z > 0.5 * (c[0] + c[1])

    def lloyd(_: int, c: jax.Array) -> jax.Array:
        up = upper_of(c)
        lower, upper = mask & ~up, mask & up
        c0 = jnp.sum(jnp.where(lower, z, 0.0)) / jnp.maximum(jnp.sum(lower), 1)
        c1 = jnp.sum(jnp.where(upper, z, 0.0)) / jnp.maximum(jnp.sum(upper), 1)
        return jnp.stack([c0, c1])

    centres = jax.lax.fori_loop(0, _KMEANS_ITERS, lloyd, centres)
    up = upper_of(centres)
    return jnp.stack([mask & ~up, mask & up]).astype(jnp.float32)


def _m_step(z: jax.Array, resp: jax.Array, reg: jax.Array) -> tuple[jax.Array, ...]:
    """Weighted moments as in sklearn (10*eps added to counts, reg added to variances)."""
    nk = jnp.sum(resp, axis=1) + 10.0 * _EPS32
    means = jnp.sum(resp * z, axis=1) / nk
    variances = jnp.sum(resp * jnp.square(z - means[:, None]), axis=1) / nk + reg
    return means, variances, nk / jnp.sum(nk)


def _e_step(
    z: jax.Array, mask: jax.Array, n: jax.Array, params: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array]:
    """Responsibilities (2, N) by log-sum-exp and the mean log-likelihood over valid entries.

    The log-sum-exp of the two components is written out (as `jax.nn.logsumexp` computes
    it, to the bit): XLA's CPU backend runs the generic reduction over a length-2 axis
    about 10x slower."""
    means, variances, weights = params
    lp0, lp1 = (
        -0.5 * (_LOG_2PI + jnp.log(variances[k]) + jnp.square(z - means[k]) / variances[k])
        + jnp.log(weights[k])
        for k in range(2)
    )
    top = jnp.maximum(lp0, lp1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    log_norm = jnp.log(jnp.exp(lp0 - top) + jnp.exp(lp1 - top)) + top
    ll = jnp.sum(jnp.where(mask, log_norm, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)
    resp = jnp.where(mask, jnp.exp(jnp.stack([lp0, lp1]) - log_norm), 0.0)
    return resp, ll


@jax.jit
def _fit_gmm_jax(
    x: jax.Array, valid: jax.Array, reg_covar: float, max_iter: int, tol: float
) -> GMMFit:
    x = x.astype(jnp.float32)
    reg_covar = jnp.float32(reg_covar)
    valid = valid.astype(bool)
    n = jnp.sum(valid).astype(jnp.int32)
    nonfinite = jnp.any(valid & ~jnp.isfinite(x))
    mask = valid & jnp.isfinite(x)
    xmin = jnp.min(jnp.where(mask, x, jnp.inf))
    xmax = jnp.max(jnp.where(mask, x, -jnp.inf))
    degenerate = (n < 2) | nonfinite | ~(xmax > xmin)

    # Standardise for float32 stability (EM is affine-equivariant with reg scaled by 1/s^2);
    # s >= sqrt(reg_covar) keeps the scaled floor <= 1.
    n_f = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    centre = jnp.sum(jnp.where(mask, x, 0.0)) / n_f
    data_var = jnp.sum(jnp.where(mask, jnp.square(x - centre), 0.0)) / n_f
    scale = jnp.maximum(jnp.sqrt(data_var), jnp.sqrt(reg_covar))
    scale = jnp.where(scale > 0, scale, 1.0)
    z = jnp.where(mask, (x - centre) / scale, 0.0)
    reg = reg_covar / jnp.square(scale)

    def cond(state: tuple) -> jax.Array:
        it, _, _, converged = state
        return (it < max_iter) & ~converged & ~degenerate

    def body(state: tuple) -> tuple:
        it, params, ll_prev, _ = state
        resp, ll = _e_step(z, mask, n, params)
        return it + 1, _m_step(z, resp, reg), ll, jnp.abs(ll - ll_prev) < tol

    params0 = _m_step(z, _kmeans_split(z, mask, n), reg)
    state0 = (jnp.int32(0), params0, jnp.float32(-jnp.inf), jnp.bool_(False))
    n_iter, params, _, converged = jax.lax.while_loop(cond, body, state0)
    resp, ll = _e_step(z, mask, n, params)

    means_z, vars_z, weights = params
    order = jnp.argsort(means_z)
    means = centre + scale * means_z[order]
    variances = jnp.square(scale) * vars_z[order]
    weights = weights[order]
    clean_prob = jnp.where(mask, resp[order[0]], 1.0)

    return GMMFit(
        means=jnp.where(degenerate, jnp.full(2, centre), means),
        variances=jnp.where(degenerate, jnp.full(2, data_var + reg_covar), variances),
        weights=jnp.where(degenerate, jnp.array([1.0, 0.0]), weights),
        clean_prob=jnp.where(degenerate, 1.0, clean_prob),
        log_likelihood=jnp.where(degenerate, jnp.nan, ll - jnp.log(scale)),
        n_iter=n_iter,
        converged=converged & ~degenerate,
        degenerate=degenerate,
    )


def fit_gmm_jax(
    x: jax.Array,
    valid: jax.Array | None = None,
    *,
    reg_covar: float = 5e-4,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> GMMFit:
    """Two-component 1-D GMM by EM in float32 under `jax.jit`; never raises on bad input.

    Initialisation is deterministic: hard responsibilities from 1-D two-means (Lloyd) started at
    the 25th/75th percentiles, then one M-step, as sklearn does after its k-means init. EM stops
    when the mean log-likelihood changes by less than `tol` (sklearn's rule) or after
    `max_iter` iterations. Entries with `valid == False` are left out of the fit and get clean
    probability 1. Degenerate input (fewer than 2 valid samples, a non-finite valid value, all
    valid values equal) gives `degenerate=True` and clean probability 1 everywhere.
    """
    x = jnp.asarray(x).reshape(-1)
    valid = jnp.ones(x.shape, bool) if valid is None else jnp.asarray(valid).reshape(-1)
    if x.size == 0:  # static shape: fit one masked-out entry, return no posteriors
        fit = _fit_gmm_jax(jnp.zeros(1), jnp.zeros(1, bool), reg_covar, max_iter, tol)
        return fit.replace(clean_prob=fit.clean_prob[:0])
    return _fit_gmm_jax(x, valid, reg_covar, max_iter, tol)


# ---------------------------------------------------------------------------- host backend


def _degenerate_reason(x: np.ndarray) -> str:
    """Why a 1-D sample cannot be fitted by a two-component mixture, or '' if it can."""
    if x.size < 2:
        return f"fewer than 2 samples ({x.size})"
    bad = int(np.sum(~np.isfinite(x)))
    if bad:
        return f"{bad} of {x.size} values are NaN or inf"
    if x.max() == x.min():
        return f"all {x.size} values are equal ({x[0]:.6g})"
    return ""


def _degenerate_fit(x: np.ndarray, mask: np.ndarray, reg_covar: float, reason: str) -> GMMFit:
    """Host-side fit that marks everything clean."""
    finite = x[mask & np.isfinite(x)]
    mean = float(finite.mean()) if finite.size else 0.0
    var = float(finite.var()) if finite.size else 0.0
    return GMMFit(
        means=np.full(2, mean),
        variances=np.full(2, var + reg_covar),
        weights=np.array([1.0, 0.0]),
        clean_prob=np.ones(x.shape, np.float32),
        log_likelihood=np.asarray(np.nan),
        n_iter=np.asarray(0),
        converged=np.asarray(False),
        degenerate=np.asarray(True),
        reason=reason,
    )


def fit_gmm_sklearn(
    x: ArrayLike,
    valid: ArrayLike | None = None,
    *,
    reg_covar: float = 5e-4,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
) -> GMMFit:
    """Two-component 1-D GMM with `sklearn.mixture.GaussianMixture` on host (float64).

    Same contract as `fit_gmm_jax` (component 0 = lower mean, masked-out entries get clean
    probability 1); degenerate input is caught before sklearn runs, and a sklearn failure
    also gives a degenerate fit with the error as `reason`. Non-convergence is reported in
    `converged`, not warned about.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    mask = np.ones(x.shape, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    xv = x[mask]
    reason = _degenerate_reason(xv)
    if reason:
        return _degenerate_fit(x, mask, reg_covar, reason)
    gm = GaussianMixture(
        n_components=2,
        covariance_type="full",
        reg_covar=reg_covar,
        tol=tol,
        max_iter=max_iter,
        random_state=seed,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(xv[:, None])
            proba = gm.predict_proba(xv[:, None])
            ll = gm.score(xv[:, None])
    except (ValueError, FloatingPointError) as err:
        return _degenerate_fit(x, mask, reg_covar, f"sklearn GaussianMixture failed: {err}")
    order = np.argsort(gm.means_[:, 0])
    clean_prob = np.ones(x.shape, np.float64)
    clean_prob[mask] = proba[:, order[0]]
    return GMMFit(
        means=gm.means_[order, 0],
        variances=gm.covariances_[order, 0, 0],
        weights=gm.weights_[order],
        clean_prob=clean_prob,
        log_likelihood=np.asarray(ll),
        n_iter=np.asarray(gm.n_iter_),
        converged=np.asarray(gm.converged_),
        degenerate=np.asarray(False),
    )


# ------------------------------------------------------------------------------ entry point

NORMALISATIONS = ("minmax", "quantile")
QUANTILES = (0.01, 0.99)
"""`normalise="quantile"` maps these quantiles of the losses to 0 and 1 and clips."""


def normalise_losses(x: np.ndarray, how: str = "minmax") -> np.ndarray:
    """Losses mapped to [0, 1] for the mixture.

    `minmax` maps the smallest loss to 0 and the largest to 1, so one extreme loss squeezes
    every other into a sliver near 0 and the mixture gives the outlier a component of its
    own. `quantile` maps the 1st and 99th percentiles to 0 and 1 and clips beyond them, so a
    few extreme losses only join the highest ones (min-max where those quantiles coincide).
    """
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown LFM normalisation {how!r}; expected one of {NORMALISATIONS}")
    lo, hi = (x.min(), x.max()) if how == "minmax" else np.quantile(x, QUANTILES)
    if not hi > lo:
        lo, hi = x.min(), x.max()
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def separation(fit: GMMFit) -> float:
    """Ashman's D of a fitted mixture: the distance of the two means in units of their pooled
    spread, sqrt(2) |m1 - m0| / sqrt(v0 + v1). Below about 2 the mixture does not split the
    losses into two groups; NaN for a degenerate fit."""
    if bool(fit.degenerate):
        return float("nan")
    means, variances = np.asarray(fit.means, float), np.asarray(fit.variances, float)
    return float(np.sqrt(2.0) * abs(means[1] - means[0]) / np.sqrt(variances.sum()))


def monotone_above_clean_mean(
    clean_prob: np.ndarray, normalised: np.ndarray, clean_mean: float
) -> np.ndarray:
    """Clean probabilities that never rise with the loss above the clean component's mean.

    When the clean component is the wider one, its tail outgrows the noisy component's and
    the posterior would call the highest losses clean again; each slice above the clean mean
    is capped by the clean probability of every lower-loss slice there. Below the mean, and
    whenever the noisy component is the wider one, nothing changes.
    """
    out = np.array(clean_prob, np.float32, copy=True)
    upper = np.flatnonzero(normalised > clean_mean)
    order = upper[np.argsort(normalised[upper], kind="stable")]
    out[order] = np.minimum.accumulate(out[order])
    return out


def split_clean_noisy(
    losses: ArrayLike,
    *,
    backend: str = "jax",
    reg_covar: float = 5e-4,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    normalise: str = "minmax",
) -> FilterResult:
    """Split samples into clean and noisy from their per-sample losses (N,).

    Normalises the losses (`normalise_losses`), fits the two-component mixture with
    `backend` ("jax" or "sklearn"; `seed` is used by sklearn only), takes the clean
    component's posterior made non-increasing above its mean (`monotone_above_clean_mean`);
    `cleansing.flags` turns it into flags.
    Degenerate input marks every sample clean and explains why in `message`; an unknown
    backend or a non-1-D input raises ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown GMM backend {backend!r}; expected one of {BACKENDS}")
    if normalise not in NORMALISATIONS:
        raise ValueError(f"unknown LFM normalisation {normalise!r}; expected {NORMALISATIONS}")
    x = np.asarray(losses, np.float64)
    if x.ndim > 1:
        raise ValueError(f"losses must be 1-D (one per sample), got shape {x.shape}")
    x = x.reshape(-1)
    reason = _degenerate_reason(x)
    normalised = np.full(x.shape, np.nan)
    if reason:
        fit = _degenerate_fit(x, np.ones(x.shape, bool), reg_covar, reason)
    else:
        normalised = normalise_losses(x, normalise)
        if backend == "jax":
            fit = jax.device_get(
                fit_gmm_jax(
                    jnp.asarray(normalised, jnp.float32),
                    reg_covar=reg_covar,
                    max_iter=max_iter,
                    tol=tol,
                )
            )
            if fit.degenerate:
                fit = fit.replace(reason="EM input degenerate in float32")
        else:
            fit = fit_gmm_sklearn(
                normalised, reg_covar=reg_covar, max_iter=max_iter, tol=tol, seed=seed
            )
    clean_prob = np.asarray(fit.clean_prob, np.float32)
    if not bool(fit.degenerate):
        clean_prob = monotone_above_clean_mean(clean_prob, normalised, float(fit.means[0]))
    message = ""
    if bool(fit.degenerate):
        message = f"LFM ({backend}): {fit.reason}; all {x.size} samples marked clean"
    return FilterResult(
        clean_prob=clean_prob,
        fit=fit,
        normalised=normalised.astype(np.float32),
        message=message,
    )
