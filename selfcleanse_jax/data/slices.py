"""Cut cases into the 2D slice table that training reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from selfcleanse_jax.data.cases import IGNORE_INDEX, Case, SliceTable


def normalize_volume(image: np.ndarray) -> np.ndarray:
    """Z-score a volume after clipping to its 0.5 / 99.5 percentiles.

    Clipping first keeps a few extreme voxels (vessels, artefacts) from setting the scale;
    per-volume statistics remove scanner- and case-dependent intensity scaling.
    """
    image = np.asarray(image, np.float32)
    lo, hi = np.percentile(image, [0.5, 99.5])
    clipped = np.clip(image, lo, hi)
    std = float(clipped.std())
    return ((clipped - clipped.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def cases_to_slices(cases: Sequence[Case], image_size: int, normalize: bool = True) -> SliceTable:
    """All slices along the last axis of every case, resized to (image_size, image_size).

    Images are interpolated linearly, labels by nearest neighbour; the in-plane spacing is
    scaled by the resize factor. Every slice is kept, including those with empty labels.
    A case without a label gives slices labelled `IGNORE_INDEX` everywhere.
    """
    if not cases:
        raise ValueError("cases_to_slices needs at least one case")
    images, labels, case_index, zs, spacing = [], [], [], [], []
    for i, case in enumerate(cases):
        image = normalize_volume(case.image) if normalize else np.asarray(case.image, np.float32)
        if case.label is None:
            label = np.full(image.shape, IGNORE_INDEX, np.uint8)
        elif case.label.shape != image.shape:
            raise ValueError(
                f"case {case.name}: label shape {case.label.shape} != image shape {image.shape}"
            )
        else:
            label = np.asarray(case.label, np.uint8)
        h, w, depth = image.shape
        if (h, w) != (image_size, image_size):
            factors = (image_size / h, image_size / w, 1.0)
            image = ndimage.zoom(image, factors, order=1)
            label = ndimage.zoom(label, factors, order=0)
        images.append(np.moveaxis(image, -1, 0))
        labels.append(np.moveaxis(label, -1, 0))
        case_index.append(np.full(depth, i, np.int32))
        zs.append(np.arange(depth, dtype=np.int32))
        voxel = (
            case.spacing[0] * h / image_size,
            case.spacing[1] * w / image_size,
            case.spacing[2],
        )
        spacing.append(np.tile(np.asarray(voxel, np.float32), (depth, 1)))
    return SliceTable(
        images=np.concatenate(images)[..., None].astype(np.float32),
        labels=np.concatenate(labels).astype(np.uint8),
        case_index=np.concatenate(case_index),
        z=np.concatenate(zs),
        case_names=[c.name for c in cases],
        spacing=np.concatenate(spacing),
    )
