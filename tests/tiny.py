"""Shared settings for tests that train: a tiny phantom and a tiny U-Net."""

from selfcleanse_jax.config import default_config

TINY_SETTINGS = {
    "data.image_size": 32,
    "data.phantom_train_cases": 4,
    "data.phantom_test_cases": 1,
    "data.phantom_slices": 4,
    "model.depth": 2,
    "model.base_width": 8,
    "train.batch_size": 8,
    "progress": False,
}
TINY = [f"--config.{key}={value}" for key, value in TINY_SETTINGS.items()]


def tiny_config(**overrides):
    config = default_config()
    for key, value in {**TINY_SETTINGS, **overrides}.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config
