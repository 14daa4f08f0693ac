"""On-device augmentation, the same geometric transform applied to image and target.

Each sample's transform is drawn from `fold_in(key, idx)`, so it depends on the step key and
the sample id only: the same global batch is augmented identically whether it runs on one
device or is split over many.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    flip: bool = True
    rot90: bool = True
    max_rotation_deg: float = 15.0
    max_scale: float = 0.1
    max_translate: float = 0.05
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1


def _random_matrix(key: jax.Array, config: AugmentConfig) -> jax.Array:
    """A 2x2 output-to-input matrix: flips, a quarter turn, then a small rotation and scale."""
    k_flip, k_rot90, k_angle, k_scale = jax.random.split(key, 4)
    flips = jnp.where(jax.random.bernoulli(k_flip, 0.5, (2,)) & config.flip, -1.0, 1.0)
    quarter = jax.random.randint(k_rot90, (), 0, 4) if config.rot90 else 0
    angle = quarter * (jnp.pi / 2) + jnp.deg2rad(config.max_rotation_deg) * jax.random.uniform(
        k_angle, minval=-1.0, maxval=1.0
    )
    scale = 1.0 + config.max_scale * jax.random.uniform(k_scale, minval=-1.0, maxval=1.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotation = jnp.array([[cos, -sin], [sin, cos]])
    return rotation @ jnp.diag(flips) / scale


def _warp(volume: jax.Array, coords: jax.Array, order: int) -> jax.Array:
    """Resample each channel of (H, W, C) at coords (2, H, W); outside is 0."""
    warp_channel = lambda channel: map_coordinates(  # noqa: E731
        channel, list(coords), order=order, mode="constant"
    )
    return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(volume)


def augment_one(
    key: jax.Array,
    image: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    config: AugmentConfig,
    soft_targets: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Augment one sample: image (H, W, C), target probabilities (H, W, K), pixel mask (H, W).

    Hard targets are resampled with nearest neighbour so they stay one-hot; soft ones linearly.
    Pixels brought in from outside the slice are background-image and masked out of the loss.
    """
    k_geom, k_shift, k_iscale, k_ishift = jax.random.split(key, 4)
    height, width = image.shape[:2]
    centre = jnp.array([(height - 1) / 2, (width - 1) / 2])
    translate = (
        config.max_translate
        * jnp.array([height, width])
        * jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0)
    )
    grid = jnp.stack(jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij"))
    offsets = grid.reshape(2, -1) - centre[:, None]
    coords = _random_matrix(k_geom, config) @ offsets + (centre + translate)[:, None]
    coords = coords.reshape(2, height, width)

    image = _warp(image.astype(jnp.float32), coords, order=1)
    target_and_mask = jnp.concatenate([target, mask[..., None]], axis=-1)
    target_and_mask = _warp(target_and_mask, coords, order=1 if soft_targets else 0)
    target, mask = target_and_mask[..., :-1], target_and_mask[..., -1]

    gain = 1.0 + config.intensity_scale * jax.random.uniform(k_iscale, minval=-1.0, maxval=1.0)
    shift = config.intensity_shift * jax.random.uniform(k_ishift, minval=-1.0, maxval=1.0)
    return image * gain + shift, target, mask


def augment_batch(
    key: jax.Array,
    idx: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    masks: jax.Array,
    config: AugmentConfig,
    soft_targets: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Augment a batch; sample i uses key `fold_in(key, idx[i])`."""
    if not config.enabled:
        return images, targets, masks
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)
    return jax.vmap(augment_one, in_axes=(0, 0, 0, 0, None, None))(
        keys, images, targets, masks, config, soft_targets
    )
