"""Self-cleansing on the embedded cardiac phantom (the default).

    selfcleanse train --config configs/phantom.py --workdir runs/phantom
    selfcleanse train --config configs/phantom.py --workdir runs/phantom_missing \
        --config.noise.kind=missing --config.method=baseline
"""

from selfcleanse_jax.config import default_config


def get_config():
    return default_config()
