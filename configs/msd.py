"""Self-cleansing on a dataset in the Medical Segmentation Decathlon layout.

    selfcleanse train --config configs/msd.py --config.data.root=/data/Task02_Heart \
        --workdir runs/heart

Slices are cut along the last axis and resized to `data.image_size`. With `noise.kind=none`
the labels are used as given (real noise); set a noise kind to study simulated noise.
"""

from selfcleanse_jax.config import default_config


def get_config():
    config = default_config()
    config.data.root = "/path/to/Task_in_MSD_layout"
    config.noise.kind = "none"
    return config
