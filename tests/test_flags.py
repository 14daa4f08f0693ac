"""A cleansing round's flags and weights from the LFM's clean probabilities."""

import numpy as np

from selfcleanse_jax.cleansing.flags import FlagSettings, flag_round

NAMES = ["background", "a", "b"]


def _round(clean_prob, previous=None, separation=3.0, unlearnt=None, filtering=False, **settings):
    n = len(clean_prob)
    return flag_round(
        np.asarray(clean_prob, np.float32),
        np.ones(n, np.float32) if previous is None else np.asarray(previous, np.float32),
        separation,
        degenerate=False,
        unlearnt=np.zeros((n, 2), bool) if unlearnt is None else np.asarray(unlearnt),
        class_names=NAMES,
        settings=FlagSettings(**settings),
        filtering=filtering,
        ramp=0.5,
        epoch=3,
    )


def test_flags_below_tau_weigh_the_ramped_weight_or_nothing_when_filtering():
    decided = _round([0.9, 0.2, 0.6, 0.1], tau=0.5, weight=0.8)
    np.testing.assert_array_equal(decided.flagged, [False, True, False, True])
    np.testing.assert_allclose(decided.weights, [1.0, 0.4, 1.0, 0.4])
    assert decided.view["flagged_share"] == 0.5 and decided.view["status"] == "ok"
    filtered = _round([0.9, 0.2, 0.6, 0.1], filtering=True)
    np.testing.assert_allclose(filtered.weights, [1.0, 0.0, 1.0, 0.0])


def test_sticky_keeps_the_lowest_clean_probability():
    decided = _round([0.9, 0.9], previous=[0.3, 1.0], sticky=True)
    np.testing.assert_allclose(decided.clean_prob, [0.3, 0.9])
    np.testing.assert_array_equal(decided.flagged, [True, False])
    assert not _round([0.9, 0.9], previous=[0.3, 1.0]).flagged.any()


def test_an_unseparated_mixture_flags_nothing():
    decided = _round([0.1, 0.2], separation=0.5, min_separation=1.0)
    assert not decided.flagged.any() and decided.view["status"] == "unseparated"
    np.testing.assert_allclose(decided.weights, 1.0)


def test_slices_with_an_unlearnt_structure_are_never_flagged_and_weigh_more():
    unlearnt = [[False, False], [True, False], [False, True]]
    decided = _round([0.1, 0.1, 0.9], unlearnt=unlearnt, unlearnt_weight=3.0)
    np.testing.assert_array_equal(decided.flagged, [True, False, False])
    np.testing.assert_allclose(decided.weights, [0.5, 3.0, 3.0])
    assert decided.view["unlearnt"] == {"a": 1, "b": 1} and decided.view["overruled"] == 1
