"""On-device augmentation: each sample's draw comes from (key, idx) alone, so it does not
depend on the batch around it nor on how many devices the batch is split over."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfcleanse_jax.augment import AugmentConfig, augment_batch

CONFIG = AugmentConfig(enabled=True)


def _batch(size: int = 8):
    keys = jax.random.split(jax.random.key(0), 2)
    images = jax.random.normal(keys[0], (size, 16, 16, 1))
    targets = jax.nn.one_hot(jax.random.randint(keys[1], (size, 16, 16), 0, 3), 3)
    masks = jnp.ones((size, 16, 16), jnp.float32)
    idx = jnp.arange(100, 100 + size)
    return idx, images, targets, masks


def test_a_samples_augmentation_depends_on_its_key_and_index_alone():
    key = jax.random.key(7)
    idx, images, targets, masks = _batch()
    whole = augment_batch(key, idx, images, targets, masks, CONFIG)
    order = np.array([5, 2, 7, 0, 1, 6, 3, 4])
    shuffled = augment_batch(key, idx[order], images[order], targets[order], masks[order], CONFIG)
    for a, b in zip(whole, shuffled, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[order], b)
    alone = augment_batch(key, idx[3:4], images[3:4], targets[3:4], masks[3:4], CONFIG)
    for a, b in zip(whole, alone, strict=True):
        np.testing.assert_allclose(np.asarray(a)[3:4], b, rtol=1e-6, atol=1e-6)
    again = augment_batch(key, idx, images, targets, masks, CONFIG)
    other = augment_batch(jax.random.key(8), idx, images, targets, masks, CONFIG)
    np.testing.assert_array_equal(whole[0], again[0])
    assert not np.allclose(whole[0], other[0])


def test_augmentation_is_the_same_on_one_device_and_split_over_four():
    assert len(jax.devices()) >= 4
    key = jax.random.key(7)
    arrays = _batch()
    augment = jax.jit(lambda *a: augment_batch(key, *a, CONFIG))
    one = augment(*jax.device_put(arrays, jax.devices()[0]))
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    split = jax.device_put(arrays, NamedSharding(mesh, PartitionSpec("data")))
    four = augment(*split)
    assert len(four[0].sharding.device_set) == 4
    for a, b in zip(one, four, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
