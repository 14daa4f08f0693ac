"""Per-sample segmentation losses: softmax cross-entropy + (1 - soft Dice over foreground)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfcleanse_jax.data.cases import IGNORE_INDEX


def label_targets(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """One-hot targets (..., K) and a pixel mask that is 0 where the label is IGNORE_INDEX."""
    labels = labels.astype(jnp.int32)
    mask = (labels != IGNORE_INDEX).astype(jnp.float32)
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[..., None], mask


def per_sample_loss(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
    dice_targets: jax.Array | None = None,
) -> jax.Array:
    """One loss per sample from logits and target probabilities (B, H, W, K), mask (B, H, W).

    Cross-entropy is averaged over unmasked pixels; soft Dice is averaged over the foreground
    classes 1..K-1 with additive smoothing, so a class absent from both target and prediction
    scores close to 1 instead of 0/0. `dice_targets` (default `targets`) gives the Dice term
    its own targets: soft Dice against a soft target is not minimised by predicting that
    target (it pays to drop pixels of low target probability), so soft pseudo-labels keep
    hard ones for the Dice term.
    """
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    pixel_ce = -jnp.sum(targets * log_probs, axis=-1) * mask
    spatial = tuple(range(1, logits.ndim - 1))
    ce = jnp.sum(pixel_ce, axis=spatial) / jnp.maximum(jnp.sum(mask, axis=spatial), 1.0)

    probs = jnp.exp(log_probs)[..., 1:] * mask[..., None]
    fg_targets = (targets if dice_targets is None else dice_targets)[..., 1:]
    intersection = jnp.sum(probs * fg_targets, axis=spatial)
    total = jnp.sum(probs, axis=spatial) + jnp.sum(fg_targets, axis=spatial)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return ce + dice_weight * (1.0 - jnp.mean(dice, axis=-1))


LFM_LOSSES = ("ce", "boundary")


def boundary_pixels(labels: jax.Array) -> jax.Array:
    """(B, H, W) bool: pixels with a 4-neighbour of another label (the image edge is not one)."""
    differs = jnp.zeros(labels.shape, bool)
    for axis in (1, 2):
        step = jnp.diff(labels, axis=axis) != 0
        before = [(0, 0)] * labels.ndim
        after = [(0, 0)] * labels.ndim
        before[axis], after[axis] = (1, 0), (0, 1)
        differs = differs | jnp.pad(step, before) | jnp.pad(step, after)
    return differs


def boundary_disagreement(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample evidence against the given label, per pixel of outline.

    Each pixel adds the cross-entropy of its given label in excess of that of the model's own
    choice (zero where they agree); the sum is divided by the number of pixels on a class
    boundary of the given label or of the prediction (at least one). The mean cross-entropy
    over a slice scales with the size of its structures (a small structure drawn 3 px too
    wide costs little of a whole slice, a large one much); this is about the width of the
    disagreement along the outlines, whatever their size, and zero for a slice the model
    labels as given. `labels` (B, H, W) int; IGNORE_INDEX pixels add nothing.
    """
    num_classes = logits.shape[-1]
    targets, mask = label_targets(labels, num_classes)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    excess = (jnp.max(log_probs, axis=-1) - jnp.sum(targets * log_probs, axis=-1)) * mask
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    given = jnp.where(mask > 0, labels.astype(jnp.int32), predicted)
    edges = (boundary_pixels(given) | boundary_pixels(predicted)) & (mask > 0)
    length = jnp.maximum(jnp.sum(edges, axis=(1, 2)).astype(jnp.float32), 1.0)
    return jnp.sum(excess, axis=(1, 2)) / length
