"""Host-side metrics: volume Dice and surface distances per class, noisy-sample detection,
pseudo-label quality.

Conventions: Dice of a class absent from both masks is 1.0 (nothing to find, nothing wrongly
found); label values outside [0, K) (e.g. IGNORE_INDEX) belong to no class, so an ignored
foreground pixel counts as missed.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def _foreground_counts(
    a: np.ndarray, b: np.ndarray, num_classes: int, axes: tuple[int, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per foreground class c in 1..K-1: |a==c & b==c| and |a==c| + |b==c|, class axis last."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    inter, total = [], []
    for c in range(1, num_classes):
        in_a, in_b = a == c, b == c
        inter.append(np.sum(in_a & in_b, axis=axes))
        total.append(np.sum(in_a, axis=axes) + np.sum(in_b, axis=axes))
    return np.stack(inter, axis=-1).astype(np.float64), np.stack(total, axis=-1).astype(np.float64)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of integer masks over the whole array (a volume), for classes 1..K-1.

    Returns shape (num_classes - 1,); a class absent from both masks scores 1.0.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    inter, total = _foreground_counts(pred, ref, num_classes, axes=None)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1.0), 1.0)


def detection_metrics(
    is_noisy_true: np.ndarray, noisy_score: np.ndarray, flagged: np.ndarray
) -> dict[str, float | None]:
    """How well the LFM finds the noisy samples.

    `noisy_score` ranks samples (higher = more likely noisy, e.g. 1 - w); `flagged` is the
    LFM's decision. auc is ROC AUC of the score, None when only one class is present or a
    score is not finite; precision (None when nothing is flagged) and recall (None when no
    sample is noisy) are those of the flags.
    """
    truth = np.asarray(is_noisy_true, bool).reshape(-1)
    score = np.asarray(noisy_score, np.float64).reshape(-1)
    flags = np.asarray(flagged, bool).reshape(-1)
    if not truth.shape == score.shape == flags.shape:
        raise ValueError(
            f"shapes differ: truth {truth.shape}, score {score.shape}, flagged {flags.shape}"
        )
    both_classes = 0 < truth.sum() < truth.size
    auc = (
        float(roc_auc_score(truth, score)) if both_classes and np.all(np.isfinite(score)) else None
    )
    hits = int(np.sum(truth & flags))
    precision = hits / int(flags.sum()) if flags.any() else None
    recall = hits / int(truth.sum()) if truth.any() else None
    return {"auc": auc, "precision": precision, "recall": recall}


def slice_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    """Per sample (N,), the mean foreground Dice over the classes present in a or b.

    a and b are (N, H, W) label maps (e.g. given vs clean, a prediction vs the given label).
    A sample with no foreground in either scores 1.0.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (N, H, W) arrays of one shape, got {a.shape}, {b.shape}")
    inter, total = _foreground_counts(a, b, num_classes, axes=(1, 2))  # (N, K-1)
    present = total > 0
    dice = np.where(present, 2.0 * inter / np.maximum(total, 1.0), 0.0)
    n_present = present.sum(axis=1)
    return np.where(n_present > 0, dice.sum(axis=1) / np.maximum(n_present, 1), 1.0)


def label_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean over samples of `slice_dice`; an empty batch gives NaN."""
    per_sample = slice_dice(a, b, num_classes)
    return float(per_sample.mean()) if per_sample.size else float("nan")


# -- volume metrics with voxel geometry (evaluation of a trained model) ----------------------


DISTANCES = ("hd95", "assd", "hd95_pooled", "hd")
"""Surface-distance measures of `surface_distances`, in mm."""


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask: the mask minus its erosion (outside counts as empty)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of pred to the nearest one of ref, and of ref to
    pred, on the bounding box of both masks rather than the whole volume: outside the box both
    masks are empty, which is what the erosion assumes of the outside, and every surface voxel
    lies inside it, so the distances are those of the whole volume."""
    from scipy import ndimage

    union = pred_mask | ref_mask
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=others))
        box.append(slice(present[0], present[-1] + 1))
    pred_surface, ref_surface = _surface(pred_mask[tuple(box)]), _surface(ref_mask[tuple(box)])
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return to_ref, to_pred


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: tuple[float, ...] | list[float]
) -> dict[str, float | None]:
    """Surface distances in millimetres between two binary masks (2-D or 3-D).

    Surfaces are the masks minus their erosions (face connectivity, outside the array counts
    as empty); the distance from every surface voxel of one mask to the nearest surface voxel
    of the other is read from a Euclidean distance transform with `sampling=spacing`, giving
    the two directed sets d(pred->ref) and d(ref->pred). Then:

    - hd95: the larger of the two directed 95th percentiles (MONAI's
      `compute_hausdorff_distance(percentile=95)`);
    - assd: the mean of both directed sets pooled (MONAI's
      `compute_average_surface_distance(symmetric=True)`, medpy >= 0.5.2 `assd`);
    - hd95_pooled: the 95th percentile of both sets pooled (medpy's `hd95`);
    - hd: the largest distance (the Hausdorff distance: MONAI's
      `compute_hausdorff_distance()`, medpy's `hd`).

    All are None when either mask is empty (undefined).
    """
    pred_mask, ref_mask = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred_mask.ndim:
        raise ValueError(f"spacing {spacing} does not match a {pred_mask.ndim}-D mask")
    if not pred_mask.any() or not ref_mask.any():
        return dict.fromkeys(DISTANCES)
    to_ref, to_pred = _directed_distances(pred_mask, ref_mask, spacing)
    pooled = np.concatenate([to_ref, to_pred])
    return {
        "hd95": float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))),
        "assd": float(pooled.mean()),
        "hd95_pooled": float(np.percentile(pooled, 95)),
        "hd": float(pooled.max()),
    }


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: tuple[float, ...] | list[float]
) -> dict[int, dict[str, float | bool | None]]:
    """Dice, IoU and the surface distances of `surface_distances` (mm) of one case, for each
    foreground class 1..K-1.

    Returns {class: {dice, iou, hd95, assd, hd95_pooled, hd, missing_distance}}. Conventions:

    - class in both masks: all measured; missing_distance False;
    - class absent from both: Dice 1, IoU 1, distances None and not counted
      (missing_distance False);
    - class in exactly one mask: Dice 0, IoU 0, distances None and counted as missing
      (missing_distance True), so that summaries can report how often they are undefined.

    Label values outside [0, K) belong to no class.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    result = {}
    for c in range(1, num_classes):
        in_pred, in_ref = pred == c, ref == c
        n_pred, n_ref = int(in_pred.sum()), int(in_ref.sum())
        if n_pred == 0 and n_ref == 0:
            result[c] = {"dice": 1.0, "iou": 1.0, **dict.fromkeys(DISTANCES)}
            result[c]["missing_distance"] = False
            continue
        inter = int(np.sum(in_pred & in_ref))
        entry = {
            "dice": 2.0 * inter / (n_pred + n_ref),
            "iou": inter / (n_pred + n_ref - inter),
            **surface_distances(in_pred, in_ref, spacing),
        }
        entry["missing_distance"] = n_pred == 0 or n_ref == 0
        result[c] = entry
    return result
