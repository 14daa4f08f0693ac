"""Host-side metrics: volume Dice per class, noisy-sample detection, pseudo-label quality.

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


def label_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean over samples of the mean foreground Dice over classes present in a or b.

    a and b are (N, H, W) label maps (e.g. given vs clean, cleansed vs clean). A sample with no
    foreground in either scores 1.0; an empty batch gives NaN.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (N, H, W) arrays of one shape, got {a.shape}, {b.shape}")
    if a.shape[0] == 0:
        return float("nan")
    inter, total = _foreground_counts(a, b, num_classes, axes=(1, 2))  # (N, K-1)
    present = total > 0
    dice = np.where(present, 2.0 * inter / np.maximum(total, 1.0), 0.0)
    n_present = present.sum(axis=1)
    per_sample = np.where(n_present > 0, dice.sum(axis=1) / np.maximum(n_present, 1), 1.0)
    return float(per_sample.mean())
