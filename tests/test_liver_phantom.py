"""The liver CT phantom: LiTS classes, tumours of the stated sizes inside the liver, CT values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from selfcleanse_jax.data.liver_phantom import LABELS, make_case
from selfcleanse_jax.data.loading import load_dataset
from tiny import tiny_config

SIZE = 64
SLICES = 6


@pytest.fixture(scope="module")
def cases():
    return [make_case(5, n, SIZE, SLICES) for n in range(16)]


def test_classes_shapes_and_hounsfield_units(cases):
    assert LABELS == {0: "background", 1: "liver", 2: "tumour"}
    for case in cases:
        assert case.image.shape == case.label.shape == (SIZE, SIZE, SLICES)
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert set(np.unique(case.label)) <= {0, 1, 2}
        assert (case.label == 1).any(axis=(0, 1)).all()  # every slice cuts the liver
        corner = case.image[:3, :3]  # air outside the body
        assert corner.mean() == pytest.approx(-1000, abs=60)
        core = ndimage.binary_erosion(case.label == 1, iterations=2)
        assert 60 < np.median(case.image[core]) < 170  # enhanced liver parenchyma
        np.testing.assert_allclose(np.diag(case.affine)[:3], case.spacing)


def test_tumours_lie_in_the_liver_with_the_stated_sizes(cases):
    with_tumour = [case for case in cases if (case.label == 2).any()]
    assert 0 < len(with_tumour) < len(cases)  # some cases have none
    diameters = []
    for case in with_tumour:
        pixel_mm = case.spacing[0]
        for z in range(SLICES):
            tumour = case.label[..., z] == 2
            liver = ndimage.binary_fill_holes(case.label[..., z] > 0)
            assert not (tumour & ~liver).any()
            parts, count = ndimage.label(tumour)
            for k in range(1, count + 1):
                area_mm2 = np.sum(parts == k) * pixel_mm**2
                diameters.append(2 * np.sqrt(area_mm2 / np.pi))
    # Spheres of 3-20 mm radius: cross-sections up to 40 mm across (touching ones merge).
    assert max(diameters) <= 60
    assert np.median(diameters) > 8
    share = np.mean([(c.label[..., z] == 2).any() for c in cases for z in range(SLICES)])
    assert 0.2 <= share <= 0.7


def test_tumours_differ_from_the_liver_around_them(cases):
    contrasts = []
    for case in cases:
        for z in range(SLICES):
            tumour = case.label[..., z] == 2
            if tumour.sum() < 6:
                continue
            core = ndimage.binary_erosion(tumour)
            rim = ndimage.binary_dilation(tumour, iterations=2) & (case.label[..., z] == 1)
            if core.any() and rim.any():
                image = case.image[..., z]
                contrasts.append(image[core].mean() - image[rim].mean())
    assert contrasts and np.mean(np.abs(contrasts)) > 15
    assert min(contrasts) < 0  # hypodense ones


def test_reproducible_and_different_per_seed():
    a, b = make_case(1, 2, 32, 3), make_case(1, 2, 32, 3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(make_case(2, 2, 32, 3).label, a.label)


def test_training_data_are_windowed_as_ct():
    dataset = load_dataset(tiny_config(**{"data.phantom": "liver"}))
    assert dataset.class_names == ["background", "liver", "tumour"]
    assert dataset.modality == "ct"
    images = dataset.train.images
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.mean(images == 0.0) > 0.1  # air and fat below the window


def test_phantom_command_draws_a_preview(tmp_path):
    from matplotlib.image import imread

    from selfcleanse_jax import cli

    png = tmp_path / "preview.png"
    args = ["phantom", "--kind", "liver", "--output", str(tmp_path / "data"), "--cases", "3"]
    assert cli.main([*args, "--test-cases", "1", "--image-size", "48", "--preview", str(png)]) == 0
    image = imread(png)
    assert image.shape[0] > 200 and image.std() > 0
