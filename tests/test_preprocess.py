"""Preprocessing: reorientation, intensities, in-plane geometry, its inverse, and the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from selfcleanse_jax.config import default_config, with_defaults
from selfcleanse_jax.data.cases import Case, SliceTable
from selfcleanse_jax.data.preprocess import (
    PreprocessSettings,
    cache_key,
    cached_slice_table,
    default_cache_dir,
    load_slice_table,
    normalize_intensity,
    normalize_volume,
    prepare_case,
    prepare_volume,
    restore_labels,
    save_slice_table,
    slice_codes,
    to_canonical,
)


def _affine(columns: np.ndarray, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = origin
    return affine


RAS = _affine(np.diag([0.9, 1.3, 4.0]))
LPS = _affine(np.diag([-0.9, -1.3, 4.0]))
# Array axes 0, 1, 2 run along S, R and -A: an axial stack stored as if it were sagittal.
PERMUTED = _affine(np.array([[0.0, 1.3, 0.0], [0.0, 0.0, -4.0], [0.9, 0.0, 0.0]]))
AFFINES = {"ras": RAS, "lps": LPS, "permuted": PERMUTED}


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(n) for n in np.linalg.norm(affine[:3, :3], axis=0))


def _world(affine: np.ndarray, index) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(index, float) + affine[:3, 3]


def _labels(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Blocky labels of three classes, so downsampling keeps most voxels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, size=(4, 4, shape[2]), dtype=np.uint8)
    rows = np.arange(shape[0]) * 4 // shape[0]
    cols = np.arange(shape[1]) * 4 // shape[1]
    return coarse[rows][:, cols]


def _settings(**kwargs) -> PreprocessSettings:
    return PreprocessSettings(**{"image_size": 32, "canonical": True, **kwargs})


def test_lps_volume_is_reoriented_to_ras_with_its_world_coordinates():
    for affine in (LPS, PERMUTED):
        array = np.zeros((5, 6, 7), np.float32)
        array[1, 2, 3] = 1.0
        out, out_affine, spacing, _ = to_canonical(array, affine, _spacing(affine))
        assert np.all(np.diag(out_affine[:3, :3]) > 0)  # RAS+: every axis increasing
        assert np.count_nonzero(out_affine[:3, :3] - np.diag(np.diag(out_affine[:3, :3]))) == 0
        np.testing.assert_allclose(spacing, np.diag(out_affine[:3, :3]))
        marked = np.argwhere(out == 1.0)[0]
        np.testing.assert_allclose(_world(out_affine, marked), _world(affine, (1, 2, 3)))
    # The permuted volume's last axis becomes its first: the slice axis is S.
    out, _, spacing, _ = to_canonical(np.zeros((5, 6, 7)), PERMUTED, _spacing(PERMUTED))
    assert out.shape == (6, 7, 5) and spacing == pytest.approx((1.3, 4.0, 0.9))


def test_ct_window_clips_and_scales_to_unit_range():
    settings = _settings(modality="ct", ct_window=(-200.0, 250.0))
    hu = np.array([-1000.0, -200.0, 25.0, 250.0, 3000.0]).reshape(1, 1, 5)
    out = normalize_intensity(hu, settings)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_mri_is_z_scored_per_volume():
    image = np.random.default_rng(0).gamma(2.0, 50.0, size=(10, 12, 3))
    out = normalize_intensity(image, _settings(modality="mri"))
    np.testing.assert_array_equal(out, normalize_volume(image))
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1.0) < 1e-5


def test_target_spacing_resamples_then_crops_and_pads():
    image = np.random.default_rng(0).normal(size=(50, 30, 4)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[20:30, 10:20] = 1
    case = Case("c", image, label, spacing=(0.8, 1.6, 5.0), affine=np.diag([0.8, 1.6, 5.0, 1]))
    # 50 * 0.8 = 40 rows and 30 * 1.6 = 48 columns at 1 mm: crop 48 -> 40 columns.
    out = prepare_case(case, _settings(image_size=40, target_spacing=1.0))
    assert out.image.shape == (40, 40, 4) and out.label.shape == (40, 40, 4)
    assert out.label.dtype == np.uint8
    np.testing.assert_allclose(out.spacing, (1.0, 1.0, 5.0))
    # Padding to 64: images with their minimum, labels with 0.
    padded = prepare_case(case, _settings(image_size=64, target_spacing=1.0))
    assert padded.image.shape == (64, 64, 4)
    assert padded.image[0, 0, 0] == padded.image.min() and padded.label[0, 0, 0] == 0
    assert np.sum(padded.label) == pytest.approx(np.sum(case.label) * 0.8 * 1.6, rel=0.05)
    # The new affine puts the label block where it was in the world.
    for prepared in (out, padded):
        centre = np.argwhere(prepared.label == 1).mean(axis=0)
        np.testing.assert_allclose(
            _world(prepared.affine, centre), _world(case.affine, (24.5, 14.5, 1.5)), atol=0.5
        )


@pytest.mark.parametrize("orientation", ["ras", "lps"])
@pytest.mark.parametrize("options", [{"image_size": 20}, {"image_size": 24, "target_spacing": 1.1}])
def test_prepared_affine_matches_the_resampled_intensities(orientation, options):
    """Intensities linear in world x and y, resampled linearly, equal the new affine's world
    coordinates at every interior voxel: the affine describes the prepared grid exactly."""
    affine = AFFINES[orientation]
    index = np.moveaxis(np.indices((30, 17, 2), dtype=float), 0, -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    image = (world[..., 0] + 100 * world[..., 1]).astype(np.float32)
    case = Case("c", image, None, _spacing(affine), affine)
    prepared = prepare_case(case, _settings(**options), normalize=False)
    grid = np.moveaxis(np.indices(prepared.image.shape, dtype=float), 0, -1)
    world = grid @ prepared.affine[:3, :3].T + prepared.affine[:3, 3]
    expected = world[..., 0] + 100 * world[..., 1]
    source = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T  # original voxel index
    inside = np.all((source >= 0) & (source <= np.array(image.shape) - 1), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(prepared.image[inside], expected[inside], rtol=1e-5, atol=1e-2)


def test_resize_mode_records_the_resized_spacing():
    case = Case("c", np.ones((40, 20, 2), np.float32), None, spacing=(1.0, 2.0, 5.0))
    out = prepare_case(case, _settings(image_size=32))
    assert out.image.shape == (32, 32, 2) and out.label is None
    np.testing.assert_allclose(out.spacing, (1.0 * 40 / 32, 2.0 * 20 / 32, 5.0))


@pytest.mark.parametrize("orientation", sorted(AFFINES))
@pytest.mark.parametrize(
    ("shape", "options", "cropped"),
    [
        ((23, 17, 5), {"image_size": 32}, False),  # resize up
        ((23, 17, 5), {"image_size": 48, "target_spacing": 0.5}, False),  # resample up, pad
        ((9, 31, 3), {"image_size": 64, "target_spacing": 0.45}, True),  # pad one axis, crop one
    ],
)
def test_prepare_then_restore_is_the_identity(orientation, shape, options, cropped):
    affine = AFFINES[orientation]
    label = np.random.default_rng(1).integers(0, 4, size=shape, dtype=np.uint8)
    image = label.astype(np.float32) + 1.0
    settings = _settings(**options)
    slices, inverse = prepare_volume(image, affine, _spacing(affine), settings)
    size = settings.image_size
    assert slices.shape[1:] == (size, size, 1) and slices.dtype == np.float32
    prepared = prepare_case(Case("c", image, label, _spacing(affine), affine), settings)
    np.testing.assert_array_equal(np.moveaxis(prepared.image, -1, 0)[..., None], slices)
    restored = restore_labels(prepared.label, inverse)
    assert restored.dtype == np.uint8
    assert (max(inverse.resampled_shape) > size) == cropped
    if not cropped:
        np.testing.assert_array_equal(restored, label)
    else:  # cropped: the window's voxels come back, those outside it are 0
        inside = restored == label
        assert 0.5 < inside.mean() < 1.0 and np.all(restored[~inside] == 0)


@pytest.mark.parametrize("orientation", sorted(AFFINES))
@pytest.mark.parametrize("options", [{"image_size": 16}, {"image_size": 32, "target_spacing": 2.0}])
def test_downsampling_round_trip_is_near_identity(orientation, options):
    affine = AFFINES[orientation]
    label = _labels((41, 27, 5), 2)
    spacing = _spacing(affine)
    settings = _settings(**options)
    prepared = prepare_case(Case("c", label.astype(np.float32), label, spacing, affine), settings)
    _, inverse = prepare_volume(label.astype(np.float32), affine, spacing, settings)
    restored = restore_labels(prepared.label, inverse)
    assert restored.shape == label.shape
    assert np.mean(restored == label) > 0.85


def test_without_canonical_the_array_keeps_its_axes():
    label = _labels((20, 12, 3), 0)
    settings = _settings(canonical=False, image_size=20, target_spacing=1.3)
    prepared = prepare_case(
        Case("c", label.astype(np.float32), label, (1.3, 1.3, 4.0), LPS), settings
    )
    np.testing.assert_array_equal(prepared.label[:, 4:16], label)


def test_settings_from_config_and_validation():
    config = default_config()
    settings = PreprocessSettings.from_config(config, "CT")
    assert settings.modality == "ct" and settings.ct_window == (-200.0, 250.0)
    assert settings.canonical and settings.image_size == 128 and settings.target_spacing == 0.0
    config.data.modality = "mri"
    assert PreprocessSettings.from_config(config, "ct").modality == "mri"
    config.data.modality = ""
    with pytest.raises(ValueError, match="modality"):
        PreprocessSettings.from_config(config, "")
    with pytest.raises(ValueError, match="modality"):
        PreprocessSettings.from_config(config, "pet")
    with pytest.raises(ValueError, match="low < high"):
        PreprocessSettings(32, "ct", (100.0, -100.0))
    with pytest.raises(ValueError, match="target_spacing"):
        PreprocessSettings(32, target_spacing=-1.0)
    with pytest.raises(ValueError, match="image_size"):
        PreprocessSettings(0)
    # An older run's config.json without the new keys, read back as predict and evaluate
    # read it: its own preprocessing (no reorientation), not today's defaults.
    saved = default_config().to_dict()
    for key in ("canonical", "target_spacing", "ct_window", "slice_axis"):
        del saved["data"][key]
    old = PreprocessSettings.from_config(with_defaults(saved), "mri")
    assert not old.canonical and old.target_spacing == 0.0 and old.slice_axis == "S"
    assert old.ct_window == (-200.0, 250.0)


def _table(seed: int) -> SliceTable:
    rng = np.random.default_rng(seed)
    return SliceTable(
        images=rng.normal(size=(3, 8, 8, 1)).astype(np.float32),
        labels=rng.integers(0, 3, size=(3, 8, 8), dtype=np.uint8),
        case_index=np.array([0, 0, 1], np.int32),
        z=np.array([0, 1, 0], np.int32),
        case_names=["a", "b"],
        spacing=np.ones((3, 3), np.float32),
    )


def test_cache_builds_once_then_loads(tmp_path, caplog):
    calls = []

    def build():
        calls.append(1)
        return _table(0)

    first = cached_slice_table(tmp_path / "cache", "k1", build)
    with caplog.at_level("INFO", logger="selfcleanse_jax"):
        second = cached_slice_table(tmp_path / "cache", "k1", build)
    assert len(calls) == 1 and "loaded" in caplog.text
    for field in ("images", "labels", "case_index", "z", "spacing"):
        np.testing.assert_array_equal(getattr(second, field), getattr(first, field))
        assert getattr(second, field).dtype == getattr(first, field).dtype
    assert second.case_names == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1.npz"]
    # A damaged cache file (garbage, or cut short) is rebuilt, not trusted.
    path = tmp_path / "cache" / "k1.npz"
    for damaged in (b"broken", path.read_bytes()[:200]):
        path.write_bytes(damaged)
        cached_slice_table(tmp_path / "cache", "k1", build)
    assert len(calls) == 3
    assert len(load_slice_table(tmp_path / "cache" / "k1.npz")) == 3


def test_save_is_atomic(tmp_path, monkeypatch):
    save_slice_table(tmp_path / "t.npz", _table(0))
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        save_slice_table(tmp_path / "t.npz", _table(1))
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temp file, old table intact
    np.testing.assert_array_equal(load_slice_table(tmp_path / "t.npz").images, _table(0).images)
    with pytest.raises(ValueError, match="t.npz"):
        (tmp_path / "t.npz").write_text("x")
        load_slice_table(tmp_path / "t.npz")


def test_cache_key_follows_files_settings_and_extra(tmp_path):
    files = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for f in files:
        f.write_bytes(b"0123")
    settings = _settings()
    key = cache_key(files, settings, {"split": "train"})
    assert key == cache_key(files, settings, {"split": "train"})
    assert key != cache_key(files, settings, {"split": "test"})
    assert key != cache_key(files, _settings(target_spacing=1.0), {"split": "train"})
    assert key != cache_key(files, _settings(modality="ct"), {"split": "train"})
    assert key != cache_key(files[:1], settings, {"split": "train"})
    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    touched = cache_key(files, settings, {"split": "train"})
    assert touched != key
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    files[1].write_bytes(b"01234")
    os.utime(files[1], ns=(stat.st_atime_ns, files[1].stat().st_mtime_ns))
    assert cache_key(files, settings, {"split": "train"}) != touched


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "selfcleanse_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "selfcleanse_jax"


# Short-axis-like stack: array axes 0, 1 in-plane (1.4 mm), axis 2 the 8 mm slices, pointing
# to world A (the first two to R and S).
THICK_A = _affine(np.array([[1.4, 0.0, 0.0], [0.0, 0.0, 8.0], [0.0, -1.4, 0.0]]))


def test_slice_codes_put_the_slicing_axis_last():
    assert slice_codes(RAS, _spacing(RAS)) == "RAS"
    assert slice_codes(RAS, _spacing(RAS), "R") == "ASR"
    assert slice_codes(THICK_A, _spacing(THICK_A), "auto") == "RSA"
    assert slice_codes(THICK_A, _spacing(THICK_A), "S") == "RAS"
    isotropic = _affine(np.diag([1.0, 1.0, 1.5]))
    assert slice_codes(isotropic, _spacing(isotropic), "auto") == "RAS"  # not 2x coarser: S


def test_auto_slices_a_thick_slice_stack_along_its_own_axis_and_restores_it():
    label = np.random.default_rng(4).integers(0, 3, size=(12, 10, 4), dtype=np.uint8)
    image = label.astype(np.float32)
    settings = _settings(image_size=24, slice_axis="auto")
    prepared = prepare_case(Case("c", image, label, _spacing(THICK_A), THICK_A), settings)
    assert prepared.image.shape == (24, 24, 4)  # one 2-D slice per acquired slice
    assert prepared.spacing[2] == pytest.approx(8.0)
    slices, inverse = prepare_volume(image, THICK_A, _spacing(THICK_A), settings)
    assert slices.shape == (4, 24, 24, 1)
    np.testing.assert_array_equal(restore_labels(prepared.label, inverse), label)
    axial = prepare_case(Case("c", image, label, _spacing(THICK_A), THICK_A), _settings())
    assert axial.image.shape[-1] == 10  # along S the stack would be cut across its slices
