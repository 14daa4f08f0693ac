"""Cases to the 2D slice table: normalisation, resizing, bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from selfcleanse_jax.data.cases import IGNORE_INDEX, Case
from selfcleanse_jax.data.preprocess import PreprocessSettings, normalize_volume, prepare_case
from selfcleanse_jax.data.slices import cases_to_slices


def _case(name: str, shape: tuple[int, int, int], seed: int, label: bool = True) -> Case:
    rng = np.random.default_rng(seed)
    image = rng.gamma(2.0, 50.0, size=shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : 3 * shape[1] // 4] = 2
    mask[shape[0] // 2 :, : shape[1] // 3] = 1
    return Case(name, image, mask if label else None, spacing=(1.0, 2.0, 5.0))


def test_normalize_volume_zscore_after_clipping():
    image = np.random.default_rng(0).normal(100.0, 10.0, size=(20, 20, 5))
    image[0, 0, 0] = 1e6  # an outlier is clipped rather than setting the scale
    out = normalize_volume(image)
    assert out.dtype == np.float32
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1.0) < 1e-5
    assert out.max() < 5.0
    np.testing.assert_array_equal(normalize_volume(np.ones((3, 3, 2))), 0.0)


def test_slices_resized_with_bookkeeping():
    cases = [_case("a", (40, 20, 3), 0), _case("b", (32, 32, 2), 1, label=False)]
    table = cases_to_slices(cases, image_size=32)
    assert table.images.shape == (5, 32, 32, 1) and table.images.dtype == np.float32
    assert table.labels.shape == (5, 32, 32) and table.labels.dtype == np.uint8
    np.testing.assert_array_equal(table.case_index, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(table.z, [0, 1, 2, 0, 1])
    assert table.case_names == ["a", "b"]
    np.testing.assert_allclose(table.spacing[0], [1.0 * 40 / 32, 2.0 * 20 / 32, 5.0])
    np.testing.assert_allclose(table.spacing[3], [1.0, 2.0, 5.0])
    # Nearest-neighbour labels keep their values; class areas scale with the resize.
    assert set(np.unique(table.labels[:3])) == {0, 1, 2}
    original = np.mean(cases[0].label == 2)
    assert abs(np.mean(table.labels[0] == 2) - original) < 0.03
    # The unlabelled case is ignored everywhere; its right-sized slices are not resampled.
    assert np.all(table.labels[3:] == IGNORE_INDEX)
    expected = np.moveaxis(normalize_volume(cases[1].image), -1, 0)[..., None]
    np.testing.assert_array_equal(table.images[3:], expected)
    np.testing.assert_array_equal(table.volume_slices(1), [3, 4])


def test_without_normalisation_keeps_intensities():
    case = _case("a", (16, 16, 2), 0)
    table = cases_to_slices([case], image_size=16, normalize=False)
    np.testing.assert_array_equal(table.images[..., 0], np.moveaxis(case.image, -1, 0))
    np.testing.assert_array_equal(table.labels, np.moveaxis(case.label, -1, 0))


def test_slices_of_cases_prepared_with_settings():
    case = _case("a", (40, 20, 3), 0)
    case.affine = np.diag([-1.0, -2.0, 5.0, 1.0])  # LPS: reoriented to RAS
    settings = PreprocessSettings(32, "ct", (0.0, 400.0), canonical=True, target_spacing=1.5)
    table = cases_to_slices([case], 32, settings=settings)
    prepared = prepare_case(case, settings)
    np.testing.assert_array_equal(table.images[..., 0], np.moveaxis(prepared.image, -1, 0))
    np.testing.assert_array_equal(table.labels, np.moveaxis(prepared.label, -1, 0))
    np.testing.assert_allclose(table.spacing[0], prepared.spacing)
    np.testing.assert_allclose(table.spacing[0], (1.5, 1.5, 5.0), rtol=0.02)
    assert table.images.min() >= 0.0 and table.images.max() <= 1.0
    # Already prepared cases are cut as they are.
    again = cases_to_slices([prepared], 32, normalize=False)
    np.testing.assert_array_equal(again.images, table.images)
    with pytest.raises(ValueError, match="image_size"):
        cases_to_slices([case], 64, settings=settings)
