"""Surface distances and per-case metrics against closed-form answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfcleanse_jax.metrics import case_metrics, surface_distances


def _disc(shape, center, radius):
    yy, xx = np.indices(shape)
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_overlapping_discs_match_the_lens_area():
    r, d = 40.0, 30.0
    a = _disc((200, 200), (100, 85), r)
    b = _disc((200, 200), (100, 85 + d), r)
    lens = 2 * r**2 * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r**2 - d**2)
    dice = lens / (math.pi * r**2)
    iou = lens / (2 * math.pi * r**2 - lens)
    m = case_metrics(a.astype(np.uint8), b.astype(np.uint8), 2, (1.0, 1.0))[1]
    assert m["dice"] == pytest.approx(dice, abs=0.01)
    assert m["iou"] == pytest.approx(iou, abs=0.01)
    assert m["missing_distance"] is False


@pytest.mark.parametrize(
    ("axis", "k", "spacing"),
    [(0, 2, (1.5, 0.8, 3.0)), (1, 3, (1.5, 0.8, 3.0)), (2, 1, (1.5, 0.8, 3.0)), (0, 1, (1, 1, 1))],
)
def test_box_shifted_along_one_axis_gives_hd95_k_times_spacing(axis, k, spacing):
    a = np.zeros((24, 24, 24), bool)
    lo, hi = [6, 6, 6], [18, 18, 18]
    lo[axis], hi[axis] = 6, 10  # thin along the shift: the end faces dominate
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    b = np.roll(a, k, axis=axis)
    d = surface_distances(a, b, spacing)
    assert d["hd95"] == pytest.approx(k * spacing[axis], rel=1e-6)
    assert 0 < d["assd"] <= k * spacing[axis]


def test_identical_masks_have_zero_distances():
    a = _disc((50, 60), (25, 30), 12)
    d = surface_distances(a, a, (0.7, 2.0))
    assert d == {"hd95": 0.0, "assd": 0.0}


def test_anisotropic_spacing_is_respected():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:7] = True
    b = np.roll(a, 1, axis=2)
    iso = surface_distances(a, b, (1.0, 1.0, 1.0))
    aniso = surface_distances(a, b, (1.0, 1.0, 5.0))
    assert iso["hd95"] == pytest.approx(1.0)
    assert aniso["hd95"] == pytest.approx(5.0)
    assert aniso["assd"] > iso["assd"]


def test_spacing_must_match_the_dimensions():
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0, 1.0, 1.0))


def test_empty_class_conventions():
    pred = np.zeros((8, 8, 4), np.uint8)
    ref = np.zeros((8, 8, 4), np.uint8)
    pred[2:5, 2:5, 1:3] = 1  # class 1 only in pred
    ref[2:5, 2:5, 1:3] = 2  # class 2 only in ref; class 3 in neither
    m = case_metrics(pred, ref, 4, (1.0, 1.0, 2.0))
    for c in (1, 2):
        assert m[c]["dice"] == 0.0 and m[c]["iou"] == 0.0
        assert m[c]["hd95"] is None and m[c]["assd"] is None
        assert m[c]["missing_distance"] is True
    assert m[3] == {"dice": 1.0, "iou": 1.0, "hd95": None, "assd": None, "missing_distance": False}


def test_case_metrics_of_a_perfect_prediction():
    ref = np.zeros((10, 10, 6), np.uint8)
    ref[2:8, 2:8, 1:5] = 1
    ref[4:6, 4:6, 2:4] = 2
    m = case_metrics(ref, ref, 3, (0.5, 0.5, 2.0))
    for c in (1, 2):
        assert m[c]["dice"] == 1.0 and m[c]["iou"] == 1.0
        assert m[c]["hd95"] == 0.0 and m[c]["assd"] == 0.0
