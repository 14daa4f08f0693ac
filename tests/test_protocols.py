"""Noise protocols: the published fractions exactly, the damage they do, the structure they drop."""

from __future__ import annotations

import numpy as np
import pytest

from selfcleanse_jax import noise
from selfcleanse_jax.data.phantom import PHANTOMS

SIZE = 64
CARDIAC = ["background", "right ventricle", "myocardium", "left ventricle"]
LIVER = ["background", "liver", "tumour"]


def _phantom_labels(kind: str, cases: int = 12, slices: int = 6) -> np.ndarray:
    make_case = PHANTOMS[kind].make_case
    volumes = [make_case(3, n, SIZE, slices).label for n in range(cases)]
    return np.concatenate([np.moveaxis(v, -1, 0) for v in volumes])


@pytest.fixture(scope="module")
def cardiac():
    return _phantom_labels("cardiac")


@pytest.fixture(scope="module")
def liver():
    return _phantom_labels("liver", cases=20)


def _eligible(labels: np.ndarray, cls: int | None) -> np.ndarray:
    if cls is None:
        return (labels > 0).any(axis=(1, 2))
    return (labels == cls).any(axis=(1, 2))


@pytest.mark.parametrize("kind", list(noise.PROTOCOLS))
def test_each_protocol_corrupts_its_exact_share_of_the_slices_it_can(kind, cardiac):
    realisation = noise.apply_noise(
        cardiac, kind, noise.default_rate(kind), 1, 4, class_names=CARDIAC
    )
    structure = 1 if kind.startswith("paper-l") else None
    eligible = _eligible(cardiac, structure)
    expected = int(np.floor(noise.default_rate(kind) * eligible.sum() + 0.5))
    assert realisation.is_noisy.sum() == expected
    assert not realisation.is_noisy[~eligible].any()
    changed = np.any(realisation.noisy_labels != cardiac, axis=(1, 2))
    np.testing.assert_array_equal(changed, realisation.is_noisy)
    assert realisation.summary()["num_uncorruptible"] == int((~eligible).sum())


def test_a_higher_rate_only_adds_noisy_slices(cardiac):
    low = noise.apply_noise(cardiac, "paper-b", 0.5, 4, 4)
    high = noise.apply_noise(cardiac, "paper-b", 0.7, 4, 4)
    assert np.all(high.is_noisy[low.is_noisy])
    np.testing.assert_array_equal(high.noisy_labels[low.is_noisy], low.noisy_labels[low.is_noisy])


def test_paper_b_mostly_dilates_by_two_to_three_pixels_at_64px(cardiac):
    realisation = noise.apply_noise(cardiac, "paper-b", 0.5, 2, 4)
    changes = [c for r in realisation.records if r["noisy"] for c in r["params"]["changes"]]
    dilated = np.mean([c["op"] == "dilate" for c in changes])
    assert 0.7 <= dilated <= 0.9
    assert {c["radius"] for c in changes} == {2, 3}  # 3-5 px at 128 px
    damage = realisation.summary()["label_damage"]
    assert 0.4 <= damage["dice"] <= 0.7
    assert 1.2 <= damage["area_ratio"] <= 1.6


def test_paper_l_leaves_out_the_right_ventricle_on_the_cardiac_phantom(cardiac):
    realisation = noise.apply_noise(cardiac, "paper-l", 0.5, 5, 4, class_names=CARDIAC)
    noisy = realisation.is_noisy
    assert not (realisation.noisy_labels[noisy] == 1).any()
    np.testing.assert_array_equal(  # everything else untouched
        np.where(cardiac[noisy] == 1, 0, cardiac[noisy]), realisation.noisy_labels[noisy]
    )
    assert realisation.params["classes"] == [1]  # recorded in the noise card
    assert realisation.params["fill"] == "surrounding"  # the RV is mostly among background
    damage = realisation.summary()["label_damage"]
    assert damage["dice"] == pytest.approx(2 / 3)  # RV Dice 0, the other two classes 1
    assert 0.6 <= damage["area_ratio"] <= 0.85


def test_paper_l_leaves_out_every_tumour_on_the_liver_phantom(liver):
    realisation = noise.apply_noise(liver, "paper-l-70", 0.7, 0, 3, class_names=LIVER)
    noisy = realisation.is_noisy
    eligible = _eligible(liver, 2)
    assert noisy.sum() == int(np.floor(0.7 * eligible.sum() + 0.5))
    assert not (realisation.noisy_labels[noisy] == 2).any()
    # A tumour left out is labelled as what surrounds it most: the liver, unless it sits on
    # the liver's edge.
    left_out = liver[noisy] == 2
    assert np.mean(realisation.noisy_labels[noisy][left_out] == 1) > 0.9
    assert realisation.summary()["label_damage"]["area_ratio"] > 0.97


def test_structure_is_found_by_class_name_or_asked_for():
    assert noise.structure_classes(["background", "liver", "tumour"]) == [2]
    assert noise.structure_classes(["background", "Liver", "Cancer"]) == [2]
    assert noise.structure_classes(["background", "RV", "myocardium", "LV"]) == [1]
    with pytest.raises(ValueError, match="noise.params.classes"):
        noise.structure_classes(["background", "lung"])
    labels = _phantom_labels("cardiac", cases=2)
    given = noise.apply_noise(labels, "paper-l", 0.5, 0, 4, params={"classes": [3]})
    assert given.params["classes"] == [3]
    assert not (given.noisy_labels[given.is_noisy] == 3).any()


def test_sweep_mixes_dilation_erosion_and_edge_noise_equally(cardiac):
    labels = np.concatenate([cardiac] * 4)
    ids = np.arange(len(labels))
    realisation = noise.apply_noise(labels, "sweep-0.7", 0.7, 0, 4, ids=ids)
    used = [r["model"] for r in realisation.records if r["noisy"]]
    for model in ("boundary-dilate", "boundary-erode", "edge"):
        assert 0.2 <= used.count(model) / len(used) <= 0.47, model


def test_rate_defaults_to_the_protocols_own():
    assert noise.resolve_rate("paper-b-70", -1.0) == 0.7
    assert noise.resolve_rate("sweep-0.3", -1.0) == 0.3
    assert noise.resolve_rate("boundary", -1.0) == 0.5
    assert noise.resolve_rate("paper-b", 0.2) == 0.2
