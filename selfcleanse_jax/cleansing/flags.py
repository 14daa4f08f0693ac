"""Which slices a cleansing round flags, and what each weighs: the LFM's clean probabilities
turned into flags and loss weights under the rules that guard them.

- a flag is `clean_prob < tau` (with `sticky`, the lowest clean probability a slice has had);
- a mixture that does not split the losses into two groups (Ashman's D below
  `min_separation`) flags nothing;
- a slice whose drawn structure the model all but misses (`lcm.unlearnt_structures`) is never
  flagged and weighs `unlearnt_weight`: the small-loss view says nothing of it;
- a flagged slice weighs 0 under `filter`, and `weight` times the ramp under `selfcleanse`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FlagSettings:
    """The `cleanse.*` keys that decide a round's flags and weights."""

    tau: float = 0.5
    sticky: bool = False
    min_separation: float = 0.0
    unlearnt_weight: float = 3.0
    weight: float = 1.0  # a flagged slice's weight under selfcleanse, at the ramp's end

    @classmethod
    def from_config(cls, cleanse: Any) -> FlagSettings:
        return cls(
            tau=cleanse.tau,
            sticky=cleanse.sticky,
            min_separation=cleanse.min_separation,
            unlearnt_weight=cleanse.unlearnt_weight,
            weight=cleanse.weight,
        )


@dataclasses.dataclass
class RoundFlags:
    """A round's decision: per slice, the clean probability kept, the flag and the weight;
    `view` says what the rules did (for the epoch's record)."""

    clean_prob: np.ndarray  # (N,) float32
    flagged: np.ndarray  # (N,) bool
    weights: np.ndarray  # (N,) float32
    view: dict[str, Any]


def flag_round(
    clean_prob: np.ndarray,
    previous: np.ndarray,
    separation: float,
    degenerate: bool,
    unlearnt: np.ndarray,
    class_names: list[str],
    settings: FlagSettings,
    filtering: bool,
    ramp: float,
    epoch: int,
) -> RoundFlags:
    """Flags and weights of one round from the LFM's `clean_prob` (N,), the clean
    probabilities kept after the round before (`previous`), the mixture's separation and
    whether its input was degenerate, and `unlearnt` (N, K-1): the drawn classes the model
    misses. `filtering`: the method is `filter` (flagged slices weigh 0)."""
    kept = np.minimum(previous, clean_prob) if settings.sticky else clean_prob.copy()
    flagged = kept < settings.tau
    weights = np.ones(len(kept), np.float32)
    view: dict[str, Any] = {
        "separation": None if np.isnan(separation) else separation,
        "status": "degenerate" if degenerate else "ok",
    }
    if separation < settings.min_separation:
        view["status"] = "unseparated"
        flagged[...] = False
        log.warning(
            "epoch %d: the LFM's mixture does not split the losses into two groups "
            "(separation %.2f < cleanse.min_separation %.2f): no slice flagged",
            epoch,
            separation,
            settings.min_separation,
        )
    hard = np.flatnonzero(unlearnt.any(axis=1))
    view["unlearnt"] = {
        name: int(n) for name, n in zip(class_names[1:], unlearnt.sum(0), strict=True)
    }
    view["overruled"] = int(flagged[hard].sum())
    if len(hard):
        # Drawn structures that the model misses: it has not learnt them, and the small-loss
        # view says nothing of these slices (it is inverted where the model has unlearnt a
        # structure that annotators leave out). They keep their labels, with their weight.
        flagged[hard] = False
        weights[hard] = settings.unlearnt_weight
        (log.warning if view["overruled"] else log.info)(
            "epoch %d: the model misses drawn structures of %d slices (%s), %d of which the "
            "LFM flagged: the small-loss view does not hold there; they keep their given "
            "labels with weight %g",
            epoch,
            len(hard),
            ", ".join(f"{k} in {n}" for k, n in view["unlearnt"].items() if n),
            view["overruled"],
            settings.unlearnt_weight,
        )
    weights[flagged] = 0.0 if filtering else settings.weight * ramp
    view["flagged_share"] = float(flagged.mean()) if len(flagged) else 0.0
    return RoundFlags(clean_prob=kept, flagged=flagged, weights=weights, view=view)
