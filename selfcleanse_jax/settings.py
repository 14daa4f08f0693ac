"""A run's configuration checked up front, before data loads or anything compiles: a key with
a value outside its choices or range is one ValueError that names the key and what it may
be, instead of a failure at the first cleansing round, after the warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections

from selfcleanse_jax.cleansing.gmm import BACKENDS, NORMALISATIONS
from selfcleanse_jax.cleansing.lcm import CALIBRATION_ESTIMATES, FALLBACKS
from selfcleanse_jax.config import METHODS
from selfcleanse_jax.distributed import INITIALIZE
from selfcleanse_jax.losses import LFM_LOSSES
from selfcleanse_jax.models.conv import CPU_CONV_LIBRARIES, CPU_REDUCE_LIBRARIES
from selfcleanse_jax.models.unet import COMPUTE_DTYPES, NORMS
from selfcleanse_jax.noise import resolve_params
from selfcleanse_jax.steps import PARALLEL_MODES

RUN_STEPS = ("each", "mapped")
"""`runs.step`: how the members of a several-run program take their train steps."""

NONFINITE_POLICIES = ("skip", "stop")
"""`train.nonfinite`: a step with a non-finite loss or gradient is skipped (and counted, up to
`train.nonfinite_limit`), or stops the run."""

CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "parallel": PARALLEL_MODES,
    "model.norm": NORMS,
    "model.compute_dtype": COMPUTE_DTYPES,
    "model.cpu_conv_library": CPU_CONV_LIBRARIES,
    "model.cpu_reduce_library": CPU_REDUCE_LIBRARIES,
    "train.nonfinite": NONFINITE_POLICIES,
    "cleanse.gmm_backend": BACKENDS,
    "cleanse.lfm_normalise": NORMALISATIONS,
    "cleanse.lfm_loss": LFM_LOSSES,
    "cleanse.fallback": FALLBACKS,
    "cleanse.calibrate_estimate": CALIBRATION_ESTIMATES,
    "distributed.initialize": INITIALIZE,
    "runs.step": RUN_STEPS,
}
"""Keys whose value is one of a few names."""

Number = int | float


def _number(value) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int) -> tuple[Callable[[object], bool], str]:
    return (lambda v: _number(v) and v == int(v) and v >= low), f"an integer >= {low}"


def _at_least(low: float, strictly: bool = False) -> tuple[Callable[[object], bool], str]:
    if strictly:
        return (lambda v: _number(v) and v > low), f"a number > {low:g}"
    return (lambda v: _number(v) and v >= low), f"a number >= {low:g}"


def _fraction(interval: str) -> tuple[Callable[[object], bool], str]:
    """A number in `interval`, one of "[0, 1]", "(0, 1)", "(0, 1]", "[0, 1)"."""
    open_low, open_high = interval[0] == "(", interval[-1] == ")"

    def valid(v) -> bool:
        above = v > 0 if open_low else v >= 0
        return above and (v < 1 if open_high else v <= 1)

    return (lambda v: _number(v) and valid(v)), f"a number in {interval}"


RANGES: dict[str, tuple[Callable[[object], bool], str]] = {
    "model.depth": _integer(1),
    "model.base_width": _integer(1),
    "model.weight_grad_parts": _integer(0),
    "train.epochs": _integer(1),
    "train.batch_size": _integer(1),
    "train.eval_batch_size": _integer(1),
    "train.learning_rate": _at_least(0, strictly=True),
    "train.weight_decay": _at_least(0),
    "train.eval_every": _integer(0),
    "train.checkpoint_every": _integer(0),
    "train.checkpoint_every_steps": _integer(0),
    "train.checkpoint_every_minutes": _at_least(0),
    "train.checkpoint_keep": _integer(1),
    "train.nonfinite_limit": _integer(0),
    "cleanse.warmup_epochs": _integer(-1),
    "cleanse.warmup_max_fraction": _fraction("(0, 1]"),
    "cleanse.saturation": _fraction("(0, 1)"),
    "cleanse.tau": _fraction("(0, 1)"),
    "cleanse.kappa": _fraction("[0, 1]"),
    "cleanse.band": _integer(1),
    "cleanse.edge_ignore": _integer(0),
    "cleanse.loss_window": _integer(1),
    "cleanse.temperature": _at_least(0, strictly=True),
    "cleanse.morph_radius": _integer(0),
    "cleanse.unlearnt_below": _fraction("[0, 1]"),
    "cleanse.unlearnt_weight": _at_least(0),
    "cleanse.teacher_decay": _fraction("[0, 1)"),
    "cleanse.round_logits_gb": _at_least(0),
    "cleanse.weight": _at_least(0),
    "cleanse.ramp_epochs": _integer(0),
    "cleanse.calibrate_min_share": _fraction("[0, 1]"),
}
"""Keys whose value is a number: the test it must pass, and how to say it."""


def _value(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming every key whose value is outside its choices or range, and
    a noise kind or parameter that does not exist; keys the config lacks are left alone."""
    problems = []
    for key, choices in CHOICES.items():
        value = _value(config, key)
        if value is not None and value not in choices:
            problems.append(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    for key, (valid, said) in RANGES.items():
        value = _value(config, key)
        if value is not None and not valid(value):
            problems.append(f"{key} must be {said}, got {value!r}")
    noise = _value(config, "noise")
    if noise is not None and noise.kind != "none":
        try:  # an unknown kind, or a parameter the kind does not have
            resolve_params(noise.kind, noise.params.to_dict())
        except ValueError as error:
            problems.append(f"noise.kind / noise.params: {error}")
        if not (_number(noise.rate) and noise.rate <= 1):
            problems.append(
                f"noise.rate must be a number <= 1 (< 0: the default), got {noise.rate!r}"
            )
    problems += _distributed_problems(_value(config, "distributed"))
    problems += _runs_problems(_value(config, "runs"))
    if problems:
        raise ValueError("; ".join(problems))


def _runs_problems(runs: ml_collections.ConfigDict | None) -> list[str]:
    """`runs.seeds` and `runs.noise_seeds`: integers >= 0, of one length or of length 1."""
    if runs is None:
        return []
    problems, lengths = [], set()
    for key in ("seeds", "noise_seeds"):
        seeds = runs[key]
        valid = isinstance(seeds, tuple | list) and all(
            _number(s) and s == int(s) and s >= 0 for s in seeds
        )
        if not valid:
            problems.append(f"runs.{key} must be a tuple of integers >= 0, got {seeds!r}")
        elif len(seeds) > 1:
            lengths.add(len(seeds))
    if len(lengths) > 1:
        problems.append(
            "runs.seeds and runs.noise_seeds must have the same length, or one of them length "
            f"0 or 1, got {tuple(runs.seeds)} and {tuple(runs.noise_seeds)}"
        )
    return problems


def _distributed_problems(settings: ml_collections.ConfigDict | None) -> list[str]:
    """An explicit coordinator needs the process count and this process's index."""
    if settings is None or not settings.coordinator:
        return []
    count, index = settings.num_processes, settings.process_id
    if not (_number(count) and count == int(count) and count >= 1):
        return [
            f"distributed.num_processes must be an integer >= 1 with a coordinator, got {count!r}"
        ]
    if not (_number(index) and index == int(index) and 0 <= index < count):
        return [f"distributed.process_id must be an integer in [0, {count}), got {index!r}"]
    return []
