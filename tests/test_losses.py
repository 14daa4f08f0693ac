"""The LFM's boundary disagreement."""

import jax.numpy as jnp
import numpy as np

from selfcleanse_jax.losses import boundary_disagreement, boundary_pixels, per_sample_loss


def _disk(radius: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2).astype(np.int32)


def _confident_logits(labels: np.ndarray, num_classes: int = 2) -> jnp.ndarray:
    return 6.0 * jnp.asarray(np.eye(num_classes)[labels])


def test_boundary_pixels_of_a_square_are_its_rim_and_the_ring_around_it():
    label = np.zeros((1, 8, 8), np.int32)
    label[0, 2:6, 2:6] = 1
    edges = np.asarray(boundary_pixels(jnp.asarray(label)))[0]
    inner_rim = 12  # the 4x4 square minus its 2x2 core
    outer_ring = 16  # background pixels with a face neighbour in the square
    assert edges.sum() == inner_rim + outer_ring
    assert not edges[3:5, 3:5].any() and not edges[0].any()


def test_a_dilated_label_costs_the_same_per_boundary_pixel_whatever_the_structure_size():
    """A model that predicts the clean disk, scored against the disk drawn 2 px too wide:
    per pixel the small disk's error is a fraction of the large one's, per boundary pixel
    they are alike."""
    small, large = 5, 15
    clean = np.stack([_disk(small), _disk(large)])
    dilated = np.stack([_disk(small + 2), _disk(large + 2)])
    logits = _confident_logits(clean)
    per_boundary = np.asarray(boundary_disagreement(logits, jnp.asarray(dilated)))
    targets = jnp.asarray(np.eye(2)[dilated], jnp.float32)
    per_pixel = np.asarray(
        per_sample_loss(logits, targets, jnp.ones(dilated.shape), dice_weight=0.0)
    )
    assert per_pixel[0] < 0.5 * per_pixel[1]
    np.testing.assert_allclose(per_boundary[0], per_boundary[1], rtol=0.25)
    clean_loss = np.asarray(boundary_disagreement(logits, jnp.asarray(clean)))
    np.testing.assert_array_equal(clean_loss, 0.0)  # the model labels the slices as given


def test_ignored_pixels_add_nothing_and_an_empty_slice_is_finite():
    label = _disk(8)[None]
    logits = _confident_logits(1 - label)  # wrong everywhere
    ignored = np.full_like(label, 255)
    assert float(boundary_disagreement(logits, jnp.asarray(ignored))[0]) == 0.0
    empty = np.zeros_like(label)
    loss = float(boundary_disagreement(_confident_logits(empty), jnp.asarray(empty))[0])
    assert loss == 0.0
