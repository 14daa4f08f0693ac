"""Metrics against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from selfcleanse_jax.data.cases import IGNORE_INDEX
from selfcleanse_jax.metrics import detection_metrics, dice_per_class, label_dice, slice_dice


def test_dice_per_class_closed_form():
    pred = np.zeros((2, 4, 4), np.int32)
    ref = np.zeros((2, 4, 4), np.int32)
    pred[0, :2, :2] = 1  # 4 voxels
    ref[0, :2, :] = 1  # 8 voxels, overlap 4 -> 2*4/12
    pred[1, 0, 0] = 2  # class 2 only in pred -> 0
    # class 3 absent from both -> 1 by convention
    dice = dice_per_class(pred, ref, num_classes=4)
    np.testing.assert_allclose(dice, [2 / 3, 0.0, 1.0])
    np.testing.assert_allclose(dice_per_class(ref, ref, 4), [1.0, 1.0, 1.0])


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes"):
        dice_per_class(np.zeros((2, 2)), np.zeros((2, 3)), 2)


def test_detection_metrics_closed_form():
    truth = np.array([1, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.4, 0.5, 0.1, 0.2])  # 5 of 6 (noisy, clean) pairs ordered right
    flagged = np.array([1, 0, 1, 0, 0], bool)
    m = detection_metrics(truth, score, flagged)
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)


def test_detection_metrics_undefined_cases():
    m = detection_metrics(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]), np.zeros(3, bool))
    assert m == {"auc": None, "precision": None, "recall": None}
    m = detection_metrics(np.array([1, 0], bool), np.array([np.nan, 0.1]), np.array([1, 0], bool))
    assert m == {"auc": None, "precision": 1.0, "recall": 1.0}


def test_label_dice_closed_form():
    a = np.zeros((3, 4, 4), np.int32)
    b = np.zeros((3, 4, 4), np.int32)
    a[0, :2, :2] = 1
    b[0, :2, :] = 1  # class 1: 2/3; class 2 absent from both -> not averaged
    a[1, 0, 0] = 2
    b[1, 0, 0] = 2
    b[1, 3, 3] = 1  # class 2: 1, class 1: 0 -> 0.5
    # sample 2: empty in both -> 1
    assert label_dice(a, b, num_classes=3) == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert label_dice(a, a, num_classes=3) == pytest.approx(1.0)


def test_label_dice_ignored_pixels_count_as_missed():
    clean = np.zeros((1, 2, 2), np.int32)
    clean[0, 0] = 1  # 2 foreground pixels
    cleansed = clean.copy()
    cleansed[0, 0, 0] = IGNORE_INDEX
    assert label_dice(cleansed, clean, num_classes=2) == pytest.approx(2 * 1 / 3)


def test_slice_dice_is_per_sample_over_the_classes_present():
    a = np.zeros((3, 4, 4), np.int32)
    b = np.zeros((3, 4, 4), np.int32)
    a[0, :2] = 1  # 8 px
    b[0, :1] = 1  # 4 px, inside: Dice 2*4/12
    a[1, 0, 0] = 2  # class 2 only in a: Dice 0 over the one class present
    # sample 2: no foreground in either
    np.testing.assert_allclose(slice_dice(a, b, 3), [8 / 12, 0.0, 1.0])
    assert label_dice(a, b, 3) == pytest.approx((8 / 12 + 0.0 + 1.0) / 3)
