"""Surface distances computed independently of `metrics.surface_distances`, as references.

Surface voxels are found by looking at the face neighbours (no erosion), distances by a k-d
tree over the voxels' positions in mm (no distance transform, no cropping), and the figures
are those of the two libraries, read from their source:

- medpy 0.5.2 `metric.binary`: `hd95` is `numpy.percentile(numpy.hstack((hd1, hd2)), 95)` of
  the two directed distance sets, `assd` the mean of their concatenation, `hd` the larger of
  the two directed maxima;
- MONAI 1.5 `compute_hausdorff_distance(percentile=95)` is `torch.max` over the two directed
  `torch.quantile(d, 0.95)` (linear interpolation, as numpy's default), and
  `compute_average_surface_distance(symmetric=True)` the mean of `torch.cat` of both sets.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def surface_points(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Positions (mm) of the mask's voxels that have a face neighbour outside the mask or
    outside the array."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1)
    inner = mask.copy()
    centre = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for step in (-1, 1):
            shifted = list(centre)
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            inner &= padded[tuple(shifted)]
    return np.argwhere(mask & ~inner) * np.asarray(spacing, float)


def directed(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of a to the nearest surface voxel of b, and back."""
    pa, pb = surface_points(a, spacing), surface_points(b, spacing)
    return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]


def figures(a_to_b: np.ndarray, b_to_a: np.ndarray) -> dict[str, float]:
    """The libraries' figures from the two directed distance sets (see the module docstring)."""
    pooled = np.concatenate([a_to_b, b_to_a])
    return {
        "hd95": max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)),  # MONAI
        "assd": pooled.mean(),  # MONAI symmetric ASD, medpy >= 0.5.2 assd
        "hd95_pooled": np.percentile(pooled, 95),  # medpy hd95
        "hd": pooled.max(),  # both
    }


def reference(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """The four figures of two non-empty masks, computed from scratch."""
    return figures(*directed(a, b, spacing))
