"""The adaptive warm-up's saturation rule (ADELE's, on the training Dice per class)."""

import numpy as np

from selfcleanse_jax.cleansing.warmup import relative_slope_drop, saturated


def _curve(epochs: int, rate: float, top: float = 0.9) -> np.ndarray:
    return top * (1.0 - np.exp(-rate * np.arange(1, epochs + 1)))


def test_an_exponential_curve_saturates_when_its_slope_has_fallen_by_the_share():
    """f' of top (1 - exp(-r t)) falls as exp(-r t): by 90% once r (T - 1) > ln 10."""
    rate = 0.3
    first = int(np.ceil(np.log(10) / rate + 1))  # 8.7 -> epoch 9
    assert relative_slope_drop(_curve(first - 1, rate)) < 0.9
    assert relative_slope_drop(_curve(first, rate)) > 0.9
    assert saturated(_curve(first, rate)[:, None]).tolist() == [True]


def test_each_class_waits_for_its_own_curve_and_an_unlearnt_class_does_not_hold_it_up():
    epochs = 10
    fast, slow = _curve(epochs, 0.6), _curve(epochs, 0.05)
    never = np.full(epochs, 0.01)
    assert saturated(np.stack([fast, slow, never], axis=1)).tolist() == [True, False, True]


def test_noise_on_the_curve_does_not_end_it_early_and_too_few_epochs_decide_nothing():
    rng = np.random.default_rng(0)
    noisy = _curve(6, 0.3) + rng.normal(0.0, 0.02, 6)
    assert not saturated(noisy[:, None])[0]
    assert relative_slope_drop(_curve(2, 0.3)) is None
    assert saturated(np.zeros((2, 1))).tolist() == [False]
