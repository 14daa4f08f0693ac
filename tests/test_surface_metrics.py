"""Surface distances and per-case metrics against closed-form answers and independent
references (tests/surface_reference.py, and medpy where it is installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from surface_reference import figures, reference

from selfcleanse_jax.metrics import DISTANCES, case_metrics, surface_distances


def _disc(shape, center, radius):
    yy, xx = np.indices(shape)
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _multiset(*groups: tuple[float, int]) -> np.ndarray:
    """Distances given as (value, count) pairs."""
    return np.concatenate([np.full(n, v, float) for v, n in groups])


def _assert_figures(got: dict, expected: dict) -> None:
    assert set(got) == set(DISTANCES)
    for k in DISTANCES:
        assert got[k] == pytest.approx(expected[k], rel=1e-12, abs=1e-12), k


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


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_two_offset_cubes(axis):
    """4^3 cubes, the second 6 voxels further along `axis` (a 2-voxel gap). Every surface voxel
    is nearest to the facing face of the other cube, straight along `axis`: the 16, 12, 12 and
    16 surface voxels of the four slices lie 3, 4, 5 and 6 voxels from it, in both directions,
    so ASSD = (3*16 + 4*12 + 5*12 + 6*16) / 56 = 4.5 voxels and HD = HD95 = 6 voxels, in mm of
    that axis's spacing only."""
    spacing = (0.5, 0.8, 2.0)
    a = np.zeros((14, 14, 14), bool)
    a[2:6, 2:6, 2:6] = True
    b = np.roll(a, 6, axis=axis)
    s = spacing[axis]
    expected = {"hd95": 6 * s, "assd": 4.5 * s, "hd95_pooled": 6 * s, "hd": 6 * s}
    _assert_figures(surface_distances(a, b, spacing), expected)


def test_cube_inside_a_larger_cube():
    """A 3^3 cube centred in a 7^3 one: surfaces of 26 and 7^3 - 5^3 = 218 voxels.

    Inner to outer: every inner surface voxel is 1 voxel from the centre along some axis and
    at most 1 along the others, so 2 voxels from the nearest outer face. Outer to inner: a
    voxel at offsets o from the centre is sqrt(sum max(0, |o_i| - 1)^2) from the inner cube,
    with at least one |o_i| = 3; counting the offsets by how many axes sit at 3 and at 2 gives
    2 (54 voxels), sqrt5 (72), sqrt6 (24), sqrt8 (36), 3 (24) and sqrt12 (8 corners).
    """
    inner = np.zeros((11, 11, 11), bool)
    inner[4:7, 4:7, 4:7] = True
    outer = np.zeros_like(inner)
    outer[2:9, 2:9, 2:9] = True
    to_outer = _multiset((2.0, 26))
    to_inner = _multiset(
        (2.0, 54), (5**0.5, 72), (6**0.5, 24), (8**0.5, 36), (3.0, 24), (12**0.5, 8)
    )
    assert to_inner.size == 218
    got = surface_distances(inner, outer, (1.0, 1.0, 1.0))
    _assert_figures(got, figures(to_outer, to_inner))
    assert got["hd"] == pytest.approx(12**0.5)
    assert got["hd95"] == pytest.approx(3.0)  # sorted to_inner[206] = [207] = 3
    # The pooled mean, not the mean of the two directed means (2 and 2.44...).
    assert got["assd"] == pytest.approx((2 * 26 + to_inner.sum()) / 244)
    assert got["assd"] != pytest.approx((2 + to_inner.mean()) / 2, rel=1e-3)


def test_sphere_against_a_shifted_sphere():
    """Two balls of radius r, the second shifted by d along an axis. Each surface voxel has a
    twin d away on the other surface, and the pole facing away from the shift is at least
    (r + d) - r = d from every voxel of the other ball, so HD = d exactly. For continuous
    spheres the mean surface distance is d/2 (the mean of |sqrt(r^2 + d^2 - 2rd u) - r| over
    u uniform in [-1, 1]); the voxel surfaces come within 5% of it."""
    r, k, spacing = 10, 3, 0.8
    idx = np.indices((28, 28, 28))
    a = sum((i - 12) ** 2 for i in idx) <= r * r
    b = np.roll(a, k, axis=1)
    d = k * spacing
    got = surface_distances(a, b, (spacing,) * 3)
    assert got["hd"] == pytest.approx(d, rel=1e-12)
    assert 0 < got["hd95"] <= d and 0 < got["hd95_pooled"] <= d
    assert got["assd"] == pytest.approx(d / 2, rel=0.05)


def test_masks_touching_the_edge_of_the_array():
    """2-D rectangles filling the array's width from its first row, 4 and 6 rows tall, with
    spacing 2 mm (rows) x 0.5 mm (columns). Outside the array counts as empty, so their first
    row and first and last columns are surface. 4-row to 6-row: 14 surface pixels on the
    other's surface, the last row's inner columns 1..6 are min(c, 7 - c) columns from the side
    walls: 0.5, 1, 1.5, 1.5, 1, 0.5 mm. 6-row to 4-row: 14 zeros, row 4's two wall pixels one
    row (2 mm) away and the 8 pixels of row 5 two rows (4 mm) away."""
    a = np.zeros((10, 8), bool)
    a[:4] = True
    b = np.zeros((10, 8), bool)
    b[:6] = True
    a_to_b = _multiset((0.0, 14), (0.5, 2), (1.0, 2), (1.5, 2))
    b_to_a = _multiset((0.0, 14), (2.0, 2), (4.0, 8))
    got = surface_distances(a, b, (2.0, 0.5))
    _assert_figures(got, figures(a_to_b, b_to_a))
    assert got["assd"] == pytest.approx(42 / 44)
    assert got["hd95"] == got["hd95_pooled"] == got["hd"] == pytest.approx(4.0)


def test_a_stray_pixel_separates_the_hd95_conventions():
    """A 3 x 3 square, and the same square with one stray pixel 10 columns (7 mm) away. The
    prediction's 9 surface pixels are 8 zeros and 7 mm; the reference's 8 are all zeros. With
    linear interpolation (numpy, torch.quantile) the 95th percentile of 8 zeros and D is
    0.6 D, of 16 zeros and D is 0.2 D."""
    ref = np.zeros((20, 20), bool)
    ref[2:5, 2:5] = True
    pred = ref.copy()
    pred[3, 14] = True
    got = surface_distances(pred, ref, (1.0, 0.7))
    expected = {"hd95": 0.6 * 7.0, "hd95_pooled": 0.2 * 7.0, "hd": 7.0, "assd": 7.0 / 17}
    _assert_figures(got, expected)
    _assert_figures(surface_distances(ref, pred, (1.0, 0.7)), expected)  # symmetric


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], fraction: float) -> np.ndarray:
    """Smooth random blobs covering about `fraction` of the array."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.5)
    return field > np.quantile(field, 1 - fraction)


def _blobby_pair(seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A reference of random blobs and a prediction that misses some of it and adds others."""
    rng = np.random.default_rng(seed)
    shape = (40, 34, 14)
    ref = _blobs(rng, shape, 0.15)
    pred = (ref & ~_blobs(rng, shape, 0.1)) | _blobs(rng, shape, 0.05)
    return pred, ref, (0.8, 1.1, 2.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blobs_match_the_independent_reference(seed):
    pred, ref, spacing = _blobby_pair(seed)
    got = surface_distances(pred, ref, spacing)
    expected = reference(pred, ref, spacing)
    for k in DISTANCES:
        assert got[k] == pytest.approx(expected[k], rel=1e-12), k
    assert got["hd95"] != pytest.approx(got["hd95_pooled"])  # the conventions do differ here


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blobs_match_medpy(seed):
    binary = pytest.importorskip(
        "medpy.metric.binary",
        reason="medpy is not installed; `pip install -e '.[crosscheck]'` runs this cross-check",
    )
    import medpy

    if tuple(int(p) for p in medpy.__version__.split(".")[:3]) < (0, 5, 2):
        pytest.skip(f"medpy {medpy.__version__}: assd is the pooled mean from 0.5.2 on")
    pred, ref, spacing = _blobby_pair(seed)
    got = surface_distances(pred, ref, spacing)
    assert got["assd"] == pytest.approx(binary.assd(pred, ref, voxelspacing=spacing), abs=1e-9)
    assert got["hd95_pooled"] == pytest.approx(
        binary.hd95(pred, ref, voxelspacing=spacing), abs=1e-9
    )
    assert got["hd"] == pytest.approx(binary.hd(pred, ref, voxelspacing=spacing), abs=1e-9)


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
    assert d == dict.fromkeys(DISTANCES, 0.0)


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
        assert all(m[c][k] is None for k in DISTANCES)
        assert m[c]["missing_distance"] is True
    assert m[3] == {"dice": 1.0, "iou": 1.0, **dict.fromkeys(DISTANCES), "missing_distance": False}


def test_case_metrics_of_a_perfect_prediction():
    ref = np.zeros((10, 10, 6), np.uint8)
    ref[2:8, 2:8, 1:5] = 1
    ref[4:6, 4:6, 2:4] = 2
    m = case_metrics(ref, ref, 3, (0.5, 0.5, 2.0))
    for c in (1, 2):
        assert m[c]["dice"] == 1.0 and m[c]["iou"] == 1.0
        assert all(m[c][k] == 0.0 for k in DISTANCES)
