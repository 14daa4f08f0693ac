"""LCM: restores missing structures, falls back when unsure, soft targets, vmap, morphology."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfcleanse_jax.cleansing.lcm import (
    OFFSET_GRID,
    LCMSettings,
    calibrated_classes,
    calibrated_offsets,
    cleanse_batch,
    cleanse_one,
    margin_areas,
)
from selfcleanse_jax.data.cases import IGNORE_INDEX

H = W = 16
K = 4


def disk(cy: int, cx: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def confident_probs(label: np.ndarray, conf: float = 0.95) -> jnp.ndarray:
    """Softmax-like probs putting `conf` on `label` and the rest spread over other classes."""
    onehot = np.eye(K, dtype=np.float32)[label]
    return jnp.asarray(onehot * conf + (1 - onehot) * (1 - conf) / (K - 1))


@pytest.fixture(scope="module")
def case() -> dict[str, np.ndarray]:
    """Clean label with classes 1 (square) and 3 (disk); the given label lacks the disk."""
    clean = np.zeros((H, W), np.int32)
    clean[2:7, 2:7] = 1
    clean[disk(10, 10, 3)] = 3
    given = np.where(clean == 3, 0, clean)
    return {"clean": clean, "given": given}


def test_restores_deleted_structure_when_model_confident(case):
    probs = confident_probs(case["clean"])
    hard, _ = cleanse_one(probs, case["given"], 0.05)
    np.testing.assert_array_equal(hard, case["clean"])
    kept, _ = cleanse_one(probs, case["given"], 1.0)
    np.testing.assert_array_equal(kept, case["given"])


@pytest.mark.parametrize("fallback", ["given", "ignore"])
def test_low_confidence_falls_back(case, fallback):
    probs = confident_probs(case["clean"], conf=0.5)  # max q = 0.5 < kappa off the given label
    hard, _ = cleanse_one(probs, case["given"], 0.0, LCMSettings(kappa=0.8, fallback=fallback))
    expected = case["given"] if fallback == "given" else np.full((H, W), IGNORE_INDEX)
    np.testing.assert_array_equal(hard, expected)


def test_ignored_given_pixels_carry_no_label(case):
    given = case["given"].copy()
    given[0, :] = IGNORE_INDEX
    probs = confident_probs(case["clean"])
    hard, soft = cleanse_one(probs, given, 0.5, LCMSettings(kappa=0.45))  # q = 0.5 * p there: 0.475
    np.testing.assert_array_equal(hard[0], case["clean"][0])
    np.testing.assert_allclose(soft[0], probs[0], atol=1e-6)
    hard, _ = cleanse_one(probs, given, 0.5, LCMSettings(kappa=0.8))
    np.testing.assert_array_equal(hard[0], IGNORE_INDEX)


def test_soft_targets_sum_to_one_and_temperature_sharpens(case):
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (H, W, K)), axis=-1)
    _, soft = cleanse_one(probs, case["given"], 0.3)
    _, sharp = cleanse_one(probs, case["given"], 0.3, LCMSettings(temperature=0.5))
    for s in (soft, sharp):
        assert s.dtype == jnp.float32
        np.testing.assert_allclose(jnp.sum(s, axis=-1), 1.0, atol=1e-5)
    q = 0.3 * jax.nn.one_hot(case["given"], K) + 0.7 * probs
    np.testing.assert_allclose(soft, q, atol=1e-6)
    expected = q**2 / jnp.sum(q**2, axis=-1, keepdims=True)
    np.testing.assert_allclose(sharp, expected, atol=1e-5)
    assert jnp.all(jnp.max(sharp, axis=-1) >= jnp.max(soft, axis=-1) - 1e-6)
    np.testing.assert_array_equal(jnp.argmax(sharp, -1), jnp.argmax(soft, -1))


def test_vmap_equals_per_sample_loop(case):
    b = 3
    logits = 3.0 * jax.random.normal(jax.random.key(1), (b, H, W, K))
    probs = jax.nn.softmax(logits, axis=-1)
    given = np.stack([case["given"], case["clean"], case["given"]])
    given[2, :3, :3] = IGNORE_INDEX
    w = jnp.array([0.1, 0.6, 0.9])
    options = dict(kappa=0.6, fallback="ignore", temperature=0.7, morph_radius=1)
    hard, soft = cleanse_batch(probs, given, w, LCMSettings(**options))
    assert hard.shape == (b, H, W) and hard.dtype == jnp.int32
    assert soft.shape == (b, H, W, K)
    for i in range(b):
        h_i, s_i = cleanse_one(probs[i], given[i], w[i], LCMSettings(**options))
        np.testing.assert_array_equal(hard[i], h_i)
        np.testing.assert_allclose(soft[i], s_i, atol=1e-6)


def test_morphology_removes_isolated_pixel_and_fills_holes():
    square = np.zeros((H, W), np.int32)
    square[2:10, 2:10] = 1
    label = square.copy()
    label[5, 5] = 0  # one-pixel hole
    label[14, 13] = 3  # isolated speck
    probs = confident_probs(label)
    raw, _ = cleanse_one(probs, label, 0.0)
    np.testing.assert_array_equal(raw, label)
    cleaned, _ = cleanse_one(probs, label, 0.0, LCMSettings(morph_radius=1))
    np.testing.assert_array_equal(cleaned, square)
    ring = np.zeros((H, W), np.int32)
    ring[3:12, 3:12] = 2
    ring[5:10, 5:10] = 0
    ring[7, 7] = 1  # a nested structure keeps its label
    filled, _ = cleanse_one(confident_probs(ring), ring, 0.0, LCMSettings(fill_holes=True))
    expected = ring.copy()
    expected[5:10, 5:10] = 2
    expected[7, 7] = 1
    np.testing.assert_array_equal(filled, expected)


def test_bad_options_raise():
    probs, given = jnp.full((2, 2, 2), 0.5), jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match="fallback"):
        LCMSettings(fallback="drop")
    with pytest.raises(ValueError, match="temperature"):
        cleanse_batch(probs[None], given[None], jnp.zeros(1), LCMSettings(temperature=0.0))


def test_a_drawn_structure_the_model_misses_is_unlearnt(case):
    from selfcleanse_jax.cleansing.lcm import unlearnt_structures

    clean = case["clean"]
    # The model has not learnt class 3, which the given label (here the clean one) draws.
    missed = np.where(clean == 3, 0, clean)
    # Trimming a structure's boundary is a correction, not a miss.
    trimmed = np.where(disk(10, 10, 2), 3, missed)
    predictions = np.stack([missed, trimmed, missed])
    given = np.stack([clean, clean, missed])  # the last draws no class 3: nothing to miss
    np.testing.assert_array_equal(
        unlearnt_structures(predictions, given, K, 0.1),
        [[False, False, True], [False, False, False], [False, False, False]],
    )
    assert not unlearnt_structures(predictions, given, K, 0.0).any()  # off


def test_disputed_fallback_ignores_only_unsure_pixels_the_model_disputes():
    given = np.array([[1, 1, 0, 0]], np.int32)
    # Unsure everywhere (max p 0.55): the model agrees with the label on the first and third
    # pixels and disputes the second and fourth.
    probs = np.zeros((1, 4, K), np.float32)
    for x, choice in enumerate([1, 0, 0, 1]):
        probs[0, x] = 0.15
        probs[0, x, choice] = 0.55
    hard, _ = cleanse_one(
        jnp.asarray(probs), given, 0.0, LCMSettings(kappa=0.8, fallback="disputed")
    )
    np.testing.assert_array_equal(np.asarray(hard), [[1, IGNORE_INDEX, 0, IGNORE_INDEX]])


def test_band_fallback_ignores_unsure_pixels_near_the_drawn_outline_only():
    given = np.zeros((H, W), np.int32)
    given[4:12, 4:12] = 1
    unsure = confident_probs(given, conf=0.5)
    hard, _ = cleanse_one(unsure, given, 0.0, LCMSettings(kappa=0.8, fallback="band", band=1))
    # Another label within one pixel (a 3x3 window): the square's outermost ring and the
    # ring around it.
    near = np.zeros((H, W), bool)
    near[3:13, 3:13] = True
    near[5:11, 5:11] = False
    np.testing.assert_array_equal(np.asarray(hard), np.where(near, IGNORE_INDEX, given))
    # Confident pixels take the pseudo-label wherever they are.
    sure = confident_probs(np.zeros((H, W), np.int32))
    hard, _ = cleanse_one(sure, given, 0.0, LCMSettings(kappa=0.8, fallback="band", band=1))
    np.testing.assert_array_equal(np.asarray(hard), 0)
    with pytest.raises(ValueError, match="band"):
        LCMSettings(fallback="band", band=0)


def test_edge_ignore_leaves_only_the_cores_of_the_given_and_cleansed_labels():
    given = np.zeros((H, W), np.int32)
    given[3:13, 3:13] = 1  # drawn too wide
    predicted = np.zeros((H, W), np.int32)
    predicted[5:11, 5:11] = 1
    hard, _ = cleanse_one(
        confident_probs(predicted), given, 0.0, LCMSettings(kappa=0.8, edge_ignore=1)
    )
    near_given = np.zeros((H, W), bool)
    near_given[2:14, 2:14] = True
    near_given[4:12, 4:12] = False
    near_predicted = np.zeros((H, W), bool)
    near_predicted[4:12, 4:12] = True
    near_predicted[6:10, 6:10] = False
    expected = np.where(near_given | near_predicted, IGNORE_INDEX, predicted)
    np.testing.assert_array_equal(np.asarray(hard), expected)
    # Off, the confident prediction is the label everywhere.
    hard, _ = cleanse_one(confident_probs(predicted), given, 0.0, LCMSettings(kappa=0.8))
    np.testing.assert_array_equal(np.asarray(hard), predicted)


def _disk_probs(size: int, radius: float) -> np.ndarray:
    """A two-class softmax (H, W, 2) whose foreground is sure inside `radius` and fades out
    over a few pixels past it: a model that draws a disk of that radius."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    foreground = 1.0 / (1.0 + np.exp(np.hypot(yy, xx) - radius))
    return np.stack([1.0 - foreground, foreground], axis=-1).astype(np.float32)


def test_margin_areas_at_offset_zero_are_the_argmax_areas_and_shrink_with_the_offset():
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 12, 12, 4)), axis=-1)
    areas = np.asarray(margin_areas(probs))
    argmax = np.asarray(jnp.argmax(probs, axis=-1))
    at_zero = areas[:, np.flatnonzero(OFFSET_GRID == 0.0)[0]]
    np.testing.assert_array_equal(
        at_zero, np.stack([(argmax == c).sum((1, 2)) for c in (1, 2, 3)], axis=1)
    )
    assert np.all(np.diff(areas, axis=1) <= 0)


def test_calibrated_offsets_bring_an_over_drawing_models_pseudo_labels_to_the_given_size():
    """A model that draws every disk 3 px wider than the trusted labels gets a positive
    offset, under which a flagged slice's pseudo-label is the size of the clean disk."""
    probs = _disk_probs(48, radius=11.0)
    yy, xx = np.mgrid[:48, :48] - 24
    given = (np.hypot(yy, xx) < 8.0).astype(np.int32)
    areas = np.asarray(margin_areas(probs[None]))
    offsets = calibrated_offsets(areas, given[None], 2)
    assert offsets[0] == 0.0 and offsets[1] > 1.0
    dilated = (np.hypot(yy, xx) < 11.0).astype(np.int32)  # a flagged slice's given label
    sure = LCMSettings(kappa=0.5)  # every pixel sure: the test is of the offsets alone
    plain, _ = cleanse_one(probs, dilated, 0.0, sure)
    calibrated, _ = cleanse_one(probs, dilated, 0.0, sure, class_offset=jnp.asarray(offsets))
    assert np.sum(plain) > 1.7 * given.sum()
    assert abs(np.sum(calibrated) - given.sum()) < 0.1 * given.sum()


def test_a_structure_left_out_of_a_trusted_label_does_not_pull_the_offset():
    """Three trusted slices the model labels with disks of radius 11: two drawn at radius 8,
    one with the disk left out. The offset matches the two that draw it; a class that no
    trusted slice both draws and predicts keeps offset 0."""
    probs = _disk_probs(48, radius=11.0)
    yy, xx = np.mgrid[:48, :48] - 24
    disk = (np.hypot(yy, xx) < 8.0).astype(np.int32)
    areas = np.asarray(margin_areas(np.stack([probs] * 3)))
    drawn_twice = calibrated_offsets(areas[:2], np.stack([disk] * 2), 2)
    left_out = calibrated_offsets(areas, np.stack([disk, disk, np.zeros_like(disk)]), 2)
    assert drawn_twice[1] > 1.0 and left_out[1] == drawn_twice[1]
    never = calibrated_offsets(areas, np.zeros((3, 48, 48), np.int32), 2)
    assert never[1] == 0.0


def test_the_median_estimate_is_not_moved_by_a_trusted_slice_drawn_too_wide():
    """Three trusted slices the model labels with disks of radius 11: two drawn at radius 8,
    one drawn at radius 11 (a dilated label the LFM trusted). The median estimate gives the
    offset of the two; the pooled one is pulled towards no offset."""
    probs = _disk_probs(48, radius=11.0)
    yy, xx = np.mgrid[:48, :48] - 24
    small, wide = ((np.hypot(yy, xx) < r).astype(np.int32) for r in (8.0, 11.0))
    areas = np.asarray(margin_areas(np.stack([probs] * 3)))
    two = calibrated_offsets(areas[:2], np.stack([small] * 2), 2, "median")
    three = np.stack([small, small, wide])
    median = calibrated_offsets(areas, three, 2, "median")
    pooled = calibrated_offsets(areas, three, 2, "pooled")
    assert two[1] > 1.0 and median[1] == two[1]
    assert 0.0 < pooled[1] < median[1] - 0.3
    with pytest.raises(ValueError, match="calibration estimate"):
        calibrated_offsets(areas, three, 2, "mean")


def test_a_class_given_smaller_than_the_minimum_area_keeps_offset_0():
    """Disks of radius 8 (about 200 pixels) given on two slices and a lesion of 20 pixels on
    three: with a minimum share of 150 of the 2304 pixels the disks are calibrated and the
    lesions never, even in a round whose trusted slices hold only a larger lesion; with 250
    neither is."""
    yy, xx = np.mgrid[:48, :48] - 24
    disk = (np.hypot(yy, xx) < 8.0).astype(np.int32)
    lesion = np.where(np.hypot(yy - 16, xx - 16) < 2.5, 2, 0).astype(np.int32)
    given = np.stack([disk, disk, lesion, lesion, lesion])
    pixels = given.shape[1] * given.shape[2]
    np.testing.assert_array_equal(calibrated_classes(given, 3, 150 / pixels), [True, False])
    np.testing.assert_array_equal(calibrated_classes(given, 3, 250 / pixels), [False, False])
    np.testing.assert_array_equal(calibrated_classes(given, 4, 0), [True, True, False])
    # the same structures at twice the size pass or fail alike (the disks' 800 pixels would
    # pass a fixed 250): the share follows the slice
    doubled = given.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(calibrated_classes(doubled, 3, 150 / pixels), [True, False])
    np.testing.assert_array_equal(calibrated_classes(doubled, 3, 250 / pixels), [False, False])
    probs = _disk_probs(48, radius=11.0)
    areas = np.asarray(margin_areas(np.stack([probs] * 2)))
    two = np.stack([disk] * 2)
    assert calibrated_offsets(areas, two, 2, "median", np.array([True]))[1] > 1.0
    assert calibrated_offsets(areas, two, 2, "median", np.array([False]))[1] == 0.0
