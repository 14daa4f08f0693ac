"""When the warm-up ends: once the model has fitted what it can learn early, class by class.

Networks fit the clean part of noisy labels first and memorise the noise later (early
learning). The small-loss view of the LFM holds only in between: before, a structure the
model has not learnt yet gives its *clean* slices the high losses (the LFM flags them and the
LCM erases the structure); long after, the noise is memorised and every loss is small.

ADELE (Liu et al., "Adaptive Early-Learning Correction for Segmentation from Noisy
Annotations", CVPR 2022) starts correcting a class once its training IoU against the given
labels has saturated: it fits f(t) = a (1 - exp(-b t^c)) to the per-epoch values and starts
when the fitted slope has fallen by a share r of its value at the first epoch,
|f'(1) - f'(t)| / |f'(1)| > r (r = 0.9). `saturated` applies that rule to each foreground
class's training Dice; the loop ends the warm-up when every class has saturated.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

MIN_EPOCHS = 3
"""The curve has three parameters: fewer points decide nothing."""

UNLEARNT_DICE = 0.05
"""A class whose training Dice never exceeds this has no learning curve to wait for."""


def early_learning_curve(t: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """ADELE's fitted training curve a (1 - exp(-b t^c))."""
    return a * (1.0 - np.exp(-b * np.power(t, c)))


def _slope(t: float, a: float, b: float, c: float) -> float:
    return a * b * c * t ** (c - 1.0) * np.exp(-b * t**c)


def relative_slope_drop(values: np.ndarray) -> float | None:
    """|f'(1) - f'(T)| / |f'(1)| of the curve fitted to values at epochs 1..T, or None when
    the fit fails (too few points, or no convergence)."""
    values = np.asarray(values, float)
    if len(values) < MIN_EPOCHS:
        return None
    t = np.arange(1, len(values) + 1, dtype=float)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b, c), _ = curve_fit(
                early_learning_curve,
                t,
                values,
                p0=(max(values.max(), 1e-3), 0.5, 1.0),
                bounds=((0.0, 1e-6, 1e-3), (1.0, 1e3, 10.0)),
                maxfev=5000,
            )
    except (RuntimeError, ValueError):
        return None
    first = _slope(1.0, a, b, c)
    if not first > 0:
        return None
    return float(abs(first - _slope(t[-1], a, b, c)) / abs(first))


def saturated(history: np.ndarray, share: float = 0.9) -> np.ndarray:
    """Per class, whether its training curve has saturated: (T, C) per-epoch values -> (C,).

    A class saturates when the fitted slope has fallen by more than `share` of its first
    value; a class that was never learnt (max below `UNLEARNT_DICE`) counts as saturated,
    since waiting does not teach it; a failed fit counts as not yet saturated.
    """
    history = np.asarray(history, float)
    out = np.zeros(history.shape[1], bool)
    for k in range(history.shape[1]):
        values = history[:, k]
        if len(values) >= MIN_EPOCHS and values.max() < UNLEARNT_DICE:
            out[k] = True
            continue
        drop = relative_slope_drop(values)
        out[k] = drop is not None and drop > share
    return out
