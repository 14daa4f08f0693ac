"""Label-noise simulators: the corruption they promise, reproducibility, and the noise card."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from selfcleanse_jax import noise
from selfcleanse_jax.noise import (
    NOISE_MODELS,
    apply_noise,
    dilate_class,
    erode_class,
    present_class_dice,
    scaled_radius_range,
)

NUM_CLASSES = 4


def _labels(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n cardiac-like labels: LV disc (3) in a myocardial ring (2), RV blob (1) beside it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.35 * size, 0.65 * size, 2)
        r = rng.uniform(0.12, 0.18) * size
        rho = np.hypot(y - cy, x - cx)
        out[i][np.hypot(y - cy, x - cx - 1.4 * r) < 1.1 * r] = 1
        out[i][rho < r + 0.1 * size] = 2
        out[i][rho < r] = 3
    return out


def test_registry_holds_the_simulators():
    assert {"boundary", "missing"} <= set(NOISE_MODELS)
    assert noise.default_params("boundary") == {
        "radius": (1, 3),
        "p_dilate": 0.5,
        "reference_size": 128,
    }
    with pytest.raises(ValueError, match="unknown noise kind"):
        apply_noise(_labels(2), "nope", 0.5, 0, NUM_CLASSES)
    with pytest.raises(ValueError, match="no parameter"):
        apply_noise(_labels(2), "boundary", 0.5, 0, NUM_CLASSES, params={"radiu": (1, 2)})


def test_a_new_model_slots_in():
    @noise.register("test_flip_all")
    def flip_all(label, rng, value: int = 1):
        return np.where(label > 0, value, 0).astype(np.uint8), {"value": value}

    try:
        realisation = apply_noise(_labels(5), "test_flip_all", 1.0, 0, NUM_CLASSES)
        assert realisation.is_noisy.all()
        assert set(np.unique(realisation.noisy_labels)) == {0, 1}
        assert realisation.records[0]["params"] == {"value": 1}
    finally:
        del NOISE_MODELS["test_flip_all"]


def test_erosion_only_removes_and_dilation_only_adds():
    label = _labels(1, 48)[0]
    for c in (1, 2, 3):
        for r in (1, 2, 4):
            eroded = erode_class(label, c, r)
            assert not np.any((eroded == c) & (label != c))  # never adds class c
            changed = eroded != label
            assert np.all(eroded[changed] == 0) and np.all(label[changed] == c)
            assert changed.any()
            dilated = dilate_class(label, c, r)
            assert np.all(dilated[label == c] == c)  # never removes class c
            changed = dilated != label
            assert np.all(dilated[changed] == c) and changed.any()


def test_erosion_and_dilation_radius_on_a_disc():
    y, x = np.mgrid[:64, :64]
    disc = (np.hypot(y - 31.5, x - 31.5) < 12).astype(np.uint8)
    for r in (2, 3, 5):
        inner = np.sum(erode_class(disc, 1, r))
        outer = np.sum(dilate_class(disc, 1, r))
        assert inner == pytest.approx(np.pi * (12 - r) ** 2, rel=0.12)
        assert outer == pytest.approx(np.pi * (12 + r) ** 2, rel=0.12)


def test_scaled_radius_range():
    assert scaled_radius_range((1, 3), (128, 128), 128) == (1, 3)
    assert scaled_radius_range((1, 3), (64, 64), 128) == (1, 2)
    assert scaled_radius_range((1, 3), (256, 256), 128) == (2, 6)
    assert scaled_radius_range((2, 5), (64, 64), None) == (2, 5)
    with pytest.raises(ValueError):
        scaled_radius_range((3, 1), (64, 64), None)


def test_boundary_records_and_directions():
    labels = _labels(30, 48)
    grown = apply_noise(labels, "boundary", 1.0, 1, NUM_CLASSES, params={"p_dilate": 1.0})
    shrunk = apply_noise(labels, "boundary", 1.0, 1, NUM_CLASSES, params={"p_dilate": 0.0})
    for clean, more, less, rec in zip(
        labels, grown.noisy_labels, shrunk.noisy_labels, grown.records, strict=True
    ):
        changes = rec["params"]["changes"]
        assert sorted(ch["class"] for ch in changes) == [1, 2, 3]
        # (1, 3) px at 128 px scales to (1, 1) at 48 px.
        assert all(ch["op"] == "dilate" and ch["radius"] == 1 for ch in changes)
        assert np.all(more[clean > 0] > 0)  # dilation never shrinks the foreground
        assert np.all(np.isin(less[less != clean], [0]))  # erosion only makes background
        assert np.all(less[less > 0] == clean[less > 0])
    assert grown.is_noisy.all() and shrunk.is_noisy.all()


def test_boundary_radius_follows_image_size():
    realisation = apply_noise(_labels(20, 128), "boundary", 1.0, 2, NUM_CLASSES)
    radii = {ch["radius"] for r in realisation.records for ch in r["params"]["changes"]}
    assert radii == {1, 2, 3}


@pytest.mark.parametrize("unit", ["class", "component"])
def test_missing_removes_exactly_one_structure(unit):
    labels = _labels(40, 32)
    labels[:, 1:4, 1:4] = 1  # a second RV component, so components differ from classes
    realisation = apply_noise(labels, "missing", 1.0, 3, NUM_CLASSES, params={"unit": unit})
    for clean, noisy, rec in zip(
        labels, realisation.noisy_labels, realisation.records, strict=True
    ):
        changed = noisy != clean
        cls = rec["params"]["class"]
        assert np.all(noisy[changed] == 0) and np.all(clean[changed] == cls)
        assert rec["pixels_changed"] == rec["params"]["size"] == changed.sum()
        if unit == "class":
            assert np.all(changed == (clean == cls))  # the whole class, nothing else
        else:
            components, _ = ndimage.label(clean == cls, structure=np.ones((3, 3)))
            assert np.unique(components[changed]).size == 1  # one component ...
            assert np.all(changed == (components == components[changed][0]))  # ... all of it
    if unit == "component":
        assert any(r["params"]["size"] == 9 for r in realisation.records)


def test_missing_restricted_to_classes_leaves_the_others():
    labels = _labels(30, 32)
    labels[::3][labels[::3] == 1] = 0  # every third slice has no RV
    realisation = apply_noise(
        labels, "missing", 1.0, 5, NUM_CLASSES, params={"classes": [1], "unit": "component"}
    )
    for clean, noisy, rec in zip(
        labels, realisation.noisy_labels, realisation.records, strict=True
    ):
        changed = noisy != clean
        if not (clean == 1).any():
            assert not rec["noisy"] and not changed.any()
            assert rec["uncorruptible"].startswith("nothing to corrupt")
        else:
            assert rec["noisy"] and rec["params"]["class"] == 1
            assert np.all(clean[changed] == 1) and np.all(noisy[changed] == 0)


def test_empty_labels_stay_clean_and_say_so():
    labels = _labels(6)
    labels[::2] = 0
    for kind in ("boundary", "missing"):
        realisation = apply_noise(labels, kind, 1.0, 0, NUM_CLASSES)
        np.testing.assert_array_equal(realisation.is_noisy, [False, True] * 3)
        np.testing.assert_array_equal(realisation.noisy_labels[::2], 0)
        assert realisation.records[0]["uncorruptible"].startswith("nothing to corrupt")
        assert realisation.summary()["num_uncorruptible"] == 3


def test_realised_rate_within_binomial_tolerance():
    labels = _labels(400, 16)
    for rate in (0.2, 0.5):
        realisation = apply_noise(labels, "missing", rate, 11, NUM_CLASSES)
        tolerance = 4 * np.sqrt(rate * (1 - rate) / len(labels))
        assert abs(realisation.is_noisy.mean() - rate) <= tolerance
        assert realisation.summary()["realised_rate"] == realisation.is_noisy.mean()
    assert not apply_noise(labels, "missing", 0.0, 11, NUM_CLASSES).is_noisy.any()


def test_same_seed_same_noise_in_any_order():
    labels = _labels(60, 24)
    ids = np.arange(100, 160)
    first = apply_noise(labels, "boundary", 0.5, 5, NUM_CLASSES, ids=ids)
    order = np.random.default_rng(0).permutation(60)
    second = apply_noise(labels[order], "boundary", 0.5, 5, NUM_CLASSES, ids=ids[order])
    np.testing.assert_array_equal(second.noisy_labels, first.noisy_labels[order])
    np.testing.assert_array_equal(second.is_noisy, first.is_noisy[order])
    assert [r["params"] for r in second.records] == [first.records[i]["params"] for i in order]
    # A subset sees the same noise, and another seed different noise.
    subset = apply_noise(labels[:10], "boundary", 0.5, 5, NUM_CLASSES, ids=ids[:10])
    np.testing.assert_array_equal(subset.noisy_labels, first.noisy_labels[:10])
    other = apply_noise(labels, "boundary", 0.5, 6, NUM_CLASSES, ids=ids)
    assert not np.array_equal(other.noisy_labels, first.noisy_labels)


def test_higher_rate_only_adds_noisy_samples():
    labels = _labels(80, 16)
    low = apply_noise(labels, "boundary", 0.2, 9, NUM_CLASSES)
    high = apply_noise(labels, "boundary", 0.6, 9, NUM_CLASSES)
    assert np.all(high.is_noisy[low.is_noisy])
    np.testing.assert_array_equal(high.noisy_labels[low.is_noisy], low.noisy_labels[low.is_noisy])


def test_none_leaves_labels_unchanged():
    labels = _labels(5)
    realisation = apply_noise(labels, "none", 1.0, 0, NUM_CLASSES)
    np.testing.assert_array_equal(realisation.noisy_labels, labels)
    assert realisation.noisy_labels is not labels
    assert not realisation.is_noisy.any()


def test_noise_card_dice_matches_recomputation(tmp_path):
    labels = _labels(50, 32)
    realisation = apply_noise(labels, "boundary", 0.6, 4, NUM_CLASSES)
    card = json.loads(realisation.save(tmp_path / "noise.json").read_text())
    assert card["kind"] == "boundary" and card["params"]["radius"] == [1, 3]
    per_class: dict[str, list[float]] = {"1": [], "2": [], "3": []}
    for i, rec in enumerate(card["records"]):
        assert rec["id"] == i and rec["noisy"] == realisation.is_noisy[i]
        noisy, clean = realisation.noisy_labels[i], labels[i]
        assert rec["pixels_changed"] == np.sum(noisy != clean)
        if not rec["noisy"]:
            np.testing.assert_array_equal(noisy, clean)
            continue
        assert rec["pixels_changed"] > 0
        for c in (1, 2, 3):
            a, b = noisy == c, clean == c
            expected = 2 * np.sum(a & b) / (a.sum() + b.sum())
            assert rec["dice"][str(c)] == pytest.approx(expected)
            per_class[str(c)].append(expected)
        assert rec["dice_noisy_vs_clean"] == pytest.approx(np.mean(list(rec["dice"].values())))
    summary = card["summary"]
    assert summary["num_noisy"] == realisation.is_noisy.sum() > 0
    for c, scores in per_class.items():
        assert summary["mean_dice_per_class"][c] == pytest.approx(np.mean(scores))


def test_present_class_dice_closed_form():
    clean = np.zeros((4, 4), np.uint8)
    noisy = np.zeros((4, 4), np.uint8)
    clean[:2, :] = 1  # 8 pixels
    noisy[:1, :] = 1  # 4 pixels, all inside -> 2*4/12
    noisy[3, 3] = 2  # only in noisy -> 0
    assert present_class_dice(noisy, clean) == {1: pytest.approx(2 / 3), 2: 0.0}


# --- markov, affine, edge, mixed and the presets ---------------------------------------------

ALL_KINDS = ["boundary", "missing", "markov", "affine", "edge", "mixed"]


def test_new_models_and_presets_are_registered():
    assert set(ALL_KINDS) <= set(NOISE_MODELS)
    assert not set(noise.PRESETS) & set(NOISE_MODELS)
    for name, (model, params) in noise.PRESETS.items():
        assert model in NOISE_MODELS
        assert set(params) <= set(noise.default_params(model)), name
        assert noise.default_params(name) == {**noise.default_params(model), **params}
    with pytest.raises(ValueError, match="already defined"):
        noise.register("markov-expand")(lambda label, rng: None)


@pytest.mark.parametrize("kind", [*ALL_KINDS, "markov-expand", "affine-severe"])
def test_realised_rate_within_binomial_tolerance_for_every_model(kind):
    labels = _labels(200, 16)
    rate = 0.3
    realisation = apply_noise(labels, kind, rate, 13, NUM_CLASSES)
    tolerance = 4 * np.sqrt(rate * (1 - rate) / len(labels))
    assert abs(realisation.is_noisy.mean() - rate) <= tolerance
    changed = np.any(realisation.noisy_labels != labels, axis=(1, 2))
    np.testing.assert_array_equal(changed, realisation.is_noisy)


@pytest.mark.parametrize("kind", [*ALL_KINDS, "markov-shrink"])
def test_same_seed_same_noise_in_any_order_and_worker_count_for_every_model(kind):
    labels = _labels(24, 24, seed=1)
    ids = np.arange(50, 74)
    first = apply_noise(labels, kind, 0.6, 5, NUM_CLASSES, ids=ids)
    order = np.random.default_rng(1).permutation(len(labels))
    second = apply_noise(labels[order], kind, 0.6, 5, NUM_CLASSES, ids=ids[order], workers=3)
    np.testing.assert_array_equal(second.noisy_labels, first.noisy_labels[order])
    assert [r["params"] for r in second.records] == [first.records[i]["params"] for i in order]
    other = apply_noise(labels, kind, 0.6, 6, NUM_CLASSES, ids=ids)
    assert not np.array_equal(other.noisy_labels, first.noisy_labels)


def _foreground_areas(labels):
    return (labels > 0).sum(axis=(1, 2)).astype(float)


def test_markov_expand_grows_and_shrink_shrinks_on_average():
    labels = _labels(30, 48)
    area = _foreground_areas(labels)
    grown = apply_noise(labels, "markov-expand", 1.0, 2, NUM_CLASSES)
    shrunk = apply_noise(labels, "markov-shrink", 1.0, 2, NUM_CLASSES)
    assert np.mean(_foreground_areas(grown.noisy_labels) / area) > 1.1
    assert np.mean(_foreground_areas(shrunk.noisy_labels) / area) < 0.9
    for rec in grown.records:  # per-class areas in the record say the same
        for ch in rec["params"]["changes"]:
            assert ch["steps"] == 3  # 8 steps at 128 px -> 3 at 48 px
    ratios = [
        ch["area_after"] / ch["area_before"]
        for rec in shrunk.records
        for ch in rec["params"]["changes"]
    ]
    assert np.mean(ratios) < 0.9


def test_markov_classes_option_touches_only_those_classes():
    labels = _labels(10, 32)
    realisation = apply_noise(labels, "markov", 1.0, 0, NUM_CLASSES, params={"classes": [1]})
    for clean, noisy in zip(labels, realisation.noisy_labels, strict=True):
        changed = noisy != clean
        assert changed.any()
        # only class 1 gains pixels or loses them (to background)
        assert np.all((noisy[changed] == 1) | (clean[changed] == 1))
        assert np.all(noisy[changed & (clean == 1)] == 0)


@pytest.mark.parametrize("beta", [0.1, 0.25, 0.4])
def test_affine_mismatch_is_close_to_beta(beta):
    labels = _labels(20, 48)
    realisation = apply_noise(labels, "affine", 1.0, 3, NUM_CLASSES, params={"beta": beta})
    for clean, noisy, rec in zip(
        labels, realisation.noisy_labels, realisation.records, strict=True
    ):
        mismatch = noise.mismatch_fraction(noisy, clean)
        assert rec["params"]["mismatch"] == pytest.approx(mismatch)
        assert abs(mismatch - beta) <= 0.05
        assert abs(rec["params"]["angle"]) <= 30
        # a rigid move keeps the foreground area up to resampling and the field of view
        assert (noisy > 0).sum() == pytest.approx((clean > 0).sum(), rel=0.1)


def test_edge_add_only_adds_and_remove_only_removes():
    labels = _labels(20, 48)
    added = apply_noise(labels, "edge-add", 1.0, 4, NUM_CLASSES)
    removed = apply_noise(labels, "edge-remove", 1.0, 4, NUM_CLASSES)
    for clean, more, less in zip(labels, added.noisy_labels, removed.noisy_labels, strict=True):
        assert np.all(more[clean > 0] > 0)  # added disks never make background
        assert (more != clean).any() and (less != clean).any()
        assert np.all(less[less != clean] == 0)  # removed disks only make background
    rec = added.records[0]["params"]["changes"]
    assert all(ch["disks_removed"] == 0 and ch["disks_added"] >= 1 for ch in rec)


def test_mixed_records_the_model_and_follows_weights():
    labels = _labels(60, 24)
    realisation = apply_noise(labels, "mixed", 1.0, 8, NUM_CLASSES)
    used = {r["model"] for r in realisation.records if r["noisy"]}
    assert used == {"boundary", "missing", "markov", "affine", "edge"}
    for r in realisation.records:
        assert r["params"]["model"] == r["model"]
    only = apply_noise(
        labels,
        "mixed",
        1.0,
        8,
        NUM_CLASSES,
        params={"weights": {"missing": 1.0, "edge": 0.0}, "model_params": {"missing": {}}},
    )
    assert {r["model"] for r in only.records} == {"missing"}
    # every sample drew `missing`: it only removes pixels, as many as it says
    for clean, noisy, rec in zip(labels, only.noisy_labels, only.records, strict=True):
        assert np.all(noisy[noisy != clean] == 0)
        assert rec["pixels_changed"] == rec["params"]["size"]


def test_presets_are_kinds_and_the_card_names_the_model(tmp_path):
    labels = _labels(8, 32)
    preset = apply_noise(labels, "markov-expand", 1.0, 1, NUM_CLASSES)
    direct = apply_noise(labels, "markov", 1.0, 1, NUM_CLASSES, params={"theta1": 0.8})
    np.testing.assert_array_equal(preset.noisy_labels, direct.noisy_labels)
    card = json.loads(preset.save(tmp_path / "card.json").read_text())
    assert card["kind"] == "markov-expand" and card["model"] == "markov"
    assert card["params"]["theta1"] == 0.8
    overridden = apply_noise(labels, "markov-expand", 1.0, 1, NUM_CLASSES, params={"steps": 2})
    assert overridden.params["theta1"] == 0.8 and overridden.params["steps"] == 2
    with pytest.raises(ValueError, match="no parameter"):
        apply_noise(labels, "edge-add", 1.0, 1, NUM_CLASSES, params={"beta": 0.1})


@pytest.mark.parametrize("kind", ["markov", "affine", "edge", "mixed"])
def test_noise_card_dice_matches_recomputation_for_new_models(kind):
    labels = _labels(16, 32)
    realisation = apply_noise(labels, kind, 0.7, 4, NUM_CLASSES)
    card = json.loads(realisation.to_json())
    for rec, noisy, clean in zip(card["records"], realisation.noisy_labels, labels, strict=True):
        assert rec["pixels_changed"] == np.sum(noisy != clean)
        if rec["noisy"]:
            expected = present_class_dice(noisy, clean)
            assert rec["dice"] == {str(c): pytest.approx(d) for c, d in expected.items()}
            assert rec["dice_noisy_vs_clean"] == pytest.approx(np.mean(list(expected.values())))


@pytest.mark.parametrize("kind", ["markov", "affine", "edge", "mixed"])
def test_new_models_keep_empty_labels_clean(kind):
    labels = _labels(4, 16)
    labels[::2] = 0
    realisation = apply_noise(labels, kind, 1.0, 0, NUM_CLASSES)
    np.testing.assert_array_equal(realisation.noisy_labels[::2], 0)
    assert realisation.records[0]["uncorruptible"].startswith("nothing to corrupt")


def test_spatial_correction_presets_follow_the_authors_code():
    labels = _labels(6, 48)
    area = _foreground_areas(labels)
    grown = apply_noise(labels, "sc-jsrt-expand", 1.0, 0, NUM_CLASSES)
    shrunk = apply_noise(labels, "sc-jsrt-shrink", 1.0, 0, NUM_CLASSES)
    assert np.all(_foreground_areas(grown.noisy_labels) > area)  # theta1 = P(expansion step)
    assert np.all(_foreground_areas(shrunk.noisy_labels) < area)
    assert grown.params["steps"] == 180 and grown.params["band"] is None
    assert grown.records[0]["params"]["changes"][0]["steps"] == 180  # not rescaled
