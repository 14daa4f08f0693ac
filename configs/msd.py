"""Self-cleansing on a dataset on disk: MSD / nnU-Net raw, ACDC or LiTS layout (detected).

    selfcleanse train --config configs/msd.py --config.data.root=/data/Task02_Heart \
        --workdir runs/heart

Volumes are reoriented to RAS+, normalised by modality, cut into slices along the superior
axis and resized to `data.image_size` (or resampled to `data.target_spacing`). With
`noise.kind=none` the labels are used as given (real noise); set a noise kind to study
simulated noise.
"""

from selfcleanse_jax.config import default_config


def get_config():
    config = default_config()
    config.data.root = "/path/to/Task_in_MSD_layout"
    config.noise.kind = "none"
    return config
