"""Self-cleansing on the embedded cardiac phantom (the default).

    selfcleanse train --config configs/phantom.py --workdir runs/phantom
    selfcleanse train --config configs/phantom.py:quick --workdir runs/phantom_quick
    selfcleanse train --config configs/phantom.py --workdir runs/phantom_missing \
        --config.noise.kind=missing --config.method=baseline
"""

from selfcleanse_jax.demo import demo_config

SIZES = ("full", "quick")


def get_config(size: str = "full"):
    """The full-size setting, or "quick": the demo's and the quick study's, minutes on a CPU."""
    if size not in SIZES:
        raise ValueError(
            f"configs/phantom.py: size must be one of {', '.join(SIZES)}, got {size!r}"
        )
    return demo_config(quick=size == "quick")
