"""The cardiac phantom: reproducible, anatomically sized, and not solvable by thresholding."""

from __future__ import annotations

import numpy as np
import pytest

from selfcleanse_jax.data.msd import read_msd
from selfcleanse_jax.data.phantom import LABELS, make_case, make_cases, write_phantom_dataset

SIZE = 64


@pytest.fixture(scope="module")
def cases():
    return make_cases(10, seed=7, image_size=SIZE, num_slices=6)


def test_shapes_types_and_geometry(cases):
    case = cases[3]
    assert case.name == "phantom_003"
    assert case.image.shape == (SIZE, SIZE, 6) and case.image.dtype == np.float32
    assert case.label.shape == (SIZE, SIZE, 6) and case.label.dtype == np.uint8
    assert set(np.unique(case.label)) <= set(LABELS)
    assert np.all(np.isfinite(case.image)) and case.image.min() >= 0  # Rician magnitude
    np.testing.assert_allclose(np.diag(case.affine)[:3], case.spacing)


def test_reproducible_from_seed_and_case_number(cases):
    again = make_case(7, 3, SIZE, 6)
    np.testing.assert_array_equal(again.image, cases[3].image)
    np.testing.assert_array_equal(again.label, cases[3].label)
    # A case does not depend on how many cases were generated.
    np.testing.assert_array_equal(make_cases(4, 7, SIZE, 6)[3].label, cases[3].label)
    assert not np.array_equal(make_case(8, 3, SIZE, 6).label, cases[3].label)
    assert not np.array_equal(cases[2].label, cases[3].label)


def test_anatomy_is_independent_of_image_size():
    small, large = make_case(1, 0, 32, 3), make_case(1, 0, 64, 3)
    for c in (1, 2, 3):
        fraction_small = np.mean(small.label == c)
        fraction_large = np.mean(large.label == c)
        assert fraction_small == pytest.approx(fraction_large, rel=0.25, abs=1e-3)


def test_basal_slices_hold_all_classes(cases):
    for case in cases:
        assert set(np.unique(case.label[..., 0])) == {0, 1, 2, 3}, case.name


def test_structure_sizes_learnable_at_64px(cases):
    """At the base: LV radius about 8-14% of the FOV, myocardium about 3-6% thick."""
    for case in cases:
        base = case.label[..., 0]
        lv_area, epi_area = np.sum(base == 3), np.sum((base == 3) | (base == 2))
        lv_radius = np.sqrt(lv_area / np.pi) / SIZE
        wall = np.sqrt(epi_area / np.pi) / SIZE - lv_radius
        assert 0.07 <= lv_radius <= 0.15, (case.name, lv_radius)
        assert 0.025 <= wall <= 0.07, (case.name, wall)


def test_heart_shrinks_towards_apex(cases):
    for case in cases:
        heart = np.sum(case.label > 0, axis=(0, 1))
        assert heart[-1] < 0.6 * heart[0], case.name
        assert np.sum(case.label[..., -1] == 3) > 0, case.name  # the LV reaches the apex


def _best_band_dice(image: np.ndarray, mask: np.ndarray, upper: bool) -> float:
    """Best Dice vs mask of any intensity band lo < image < hi (hi = inf unless `upper`)."""
    levels = np.quantile(image, np.linspace(0.0, 1.0, 41))
    best = 0.0
    for lo in levels:
        for hi in levels[levels > lo] if upper else [np.inf]:
            band = (image > lo) & (image < hi)
            best = max(best, 2 * np.sum(band & mask) / (band.sum() + mask.sum()))
    return best


def test_intensities_differ_by_class_but_not_by_threshold(cases):
    blood_dice = []
    for case in cases:
        image, label = case.image[..., 0], case.label[..., 0]
        mean = {c: image[label == c].mean() for c in range(4)}
        # Blood pools are brighter than the myocardium ...
        assert min(mean[1], mean[3]) > 1.5 * mean[2], case.name
        # ... but the two ventricles have similar brightness,
        assert 0.7 < mean[1] / mean[3] < 1.3, case.name
        # no intensity band picks out the myocardium,
        assert _best_band_dice(image, label == 2, upper=True) < 0.6, case.name
        # and bright fat and vessels get in the way of thresholding the blood pools.
        blood_dice.append(_best_band_dice(image, np.isin(label, [1, 3]), upper=False))
    assert np.mean(blood_dice) < 0.85


def test_write_phantom_dataset(tmp_path):
    root = write_phantom_dataset(
        tmp_path / "phantom", num_train=2, num_test=1, seed=3, image_size=32, num_slices=2
    )
    train, description = read_msd(root, "train")
    test, _ = read_msd(root, "test")
    assert [c.name for c in train] == ["phantom_000", "phantom_001"]
    assert [c.name for c in test] == ["phantom_002"]
    assert description["labels"] == {str(k): v for k, v in LABELS.items()}
    np.testing.assert_array_equal(test[0].label, make_case(3, 2, 32, 2).label)
