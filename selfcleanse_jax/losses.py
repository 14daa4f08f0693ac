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
