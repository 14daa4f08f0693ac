"""Cut prepared cases into the 2D slice table that training reads."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from selfcleanse_jax.data.cases import IGNORE_INDEX, Case, SliceTable
from selfcleanse_jax.data.preprocess import PreprocessSettings, prepare_case


def cases_to_slices(
    cases: Iterable[Case],
    image_size: int,
    normalize: bool = True,
    settings: PreprocessSettings | None = None,
) -> SliceTable:
    """All slices along the last axis of every case, each case prepared by `prepare_case`.

    With `settings` (whose image_size must be `image_size`) cases are prepared as they say;
    without, each slice is resized to (image_size, image_size) and, with `normalize`, z-scored
    as MRI. Cases already prepared, cut with `normalize=False`, are taken as they are. Every
    slice is kept, including those with empty labels; a case without a label gives slices
    labelled `IGNORE_INDEX` everywhere. `cases` may be an iterator: each case is prepared as it
    comes, so only the prepared slices are held in memory.
    """
    if settings is None:
        settings = PreprocessSettings(image_size=image_size)
    elif settings.image_size != image_size:
        raise ValueError(f"image_size {image_size} != settings.image_size {settings.image_size}")
    images, labels, case_index, zs, spacing, names = [], [], [], [], [], []
    for i, case in enumerate(cases):
        names.append(case.name)
        prepared = prepare_case(case, settings, normalize=normalize)
        depth = prepared.image.shape[-1]
        label = prepared.label
        if label is None:
            label = np.full(prepared.image.shape, IGNORE_INDEX, np.uint8)
        images.append(np.moveaxis(prepared.image, -1, 0))
        labels.append(np.moveaxis(label, -1, 0))
        case_index.append(np.full(depth, i, np.int32))
        zs.append(np.arange(depth, dtype=np.int32))
        spacing.append(np.tile(np.asarray(prepared.spacing, np.float32), (depth, 1)))
    if not names:
        raise ValueError("cases_to_slices needs at least one case")
    return SliceTable(
        images=np.concatenate(images)[..., None].astype(np.float32),
        labels=np.concatenate(labels).astype(np.uint8),
        case_index=np.concatenate(case_index),
        z=np.concatenate(zs),
        case_names=names,
        spacing=np.concatenate(spacing),
    )
