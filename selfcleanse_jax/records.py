"""What a training run records in its folder, and how: one schema for the loop that writes it
and for `report`, the notebooks and the study that read it.

- `metrics.jsonl`: one `EpochRecord` per finished epoch, appended and fsynced;
- `dynamics/epoch_NNNN.npz`: per training slice, `EPOCH_ARRAYS` every epoch and
  `ROUND_ARRAYS` too after a cleansing round;
- `summary.json`: the `Summary`, written last, when every epoch is done.

Every file is written atomically (`atomic`); `keep_records_before` drops the records of the
epochs a resumed run trains again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from selfcleanse_jax import atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DYNAMICS_DIR = "dynamics"

EPOCH_ARRAYS = ("idx", "train_loss", "weight")
"""Per slice, every epoch: stable id, the epoch's training loss (NaN if unseen), loss weight."""

ROUND_ARRAYS = ("lfm_loss", "lfm_input", "clean_prob", "flagged", "prediction_given_dice")
"""Per slice, after a cleansing round: the LFM loss against the given label, the GMM's input,
the clean probability, the flag and the Dice of the model's prediction to the given label."""


class PseudoLabelDice(TypedDict):
    """Mean Dice to the clean labels of the flagged slices' given and cleansed labels."""

    given: float
    cleansed: float


class CleanseRecord(TypedDict, total=False):
    """One cleansing round; `detection` and `pseudo_label_dice` with simulated noise only."""

    flagged: int
    gmm_means: list[float]
    gmm_variances: list[float]
    gmm_weights: list[float]
    gmm_degenerate: bool
    lfm_view: dict[str, Any]
    class_offsets: list[float]  # with cleanse.calibrate, when the round flags slices
    lfm_class_offsets: list[float]  # with cleanse.calibrate_lfm
    detection: dict[str, float | None]
    pseudo_label_dice: PseudoLabelDice | None


OPTIONAL_CLEANSE_FIELDS = frozenset({"class_offsets", "lfm_class_offsets"})
"""`CleanseRecord` fields that only an option writes: `cleanse.calibrate` (in a round that
flags slices) and `cleanse.calibrate_lfm`."""


class EpochRecord(TypedDict, total=False):
    """One line of metrics.jsonl; test Dice on evaluated epochs only."""

    epoch: int
    cleanse: CleanseRecord
    train_loss: float
    nonfinite_steps: int
    warmup: dict[str, Any]
    test_dice: float
    test_dice_per_class: dict[str, float]
    seconds: float


class Summary(TypedDict):
    """summary.json: the run's result."""

    method: str
    noise: str
    test_dice: float
    test_dice_per_class: dict[str, float]
    cleanse: CleanseRecord | None
    seconds: float


def append_epoch(workdir: Path, record: EpochRecord) -> None:
    atomic.append_line(workdir / METRICS_FILE, json.dumps(record))


def write_summary(workdir: Path, summary: Summary) -> None:
    atomic.write_text(workdir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")


def dynamics_path(workdir: Path, epoch: int) -> Path:
    return workdir / DYNAMICS_DIR / f"epoch_{epoch:04d}.npz"


def write_dynamics(workdir: Path, epoch: int, arrays: dict[str, np.ndarray]) -> None:
    """One epoch's per-slice arrays: `EPOCH_ARRAYS`, with all of `ROUND_ARRAYS` or none."""
    names = set(arrays)
    if names not in (set(EPOCH_ARRAYS), set(EPOCH_ARRAYS) | set(ROUND_ARRAYS)):
        raise ValueError(f"dynamics arrays {sorted(names)} do not follow the records' schema")
    with atomic.replacing(dynamics_path(workdir, epoch), "wb") as f:
        np.savez_compressed(f, **arrays)


def read_metrics(workdir: Path) -> list[EpochRecord]:
    """The per-epoch records of metrics.jsonl, one per epoch (a resumed run may repeat epochs
    it trained again; the later record wins), sorted by epoch."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{workdir}: no {METRICS_FILE}, not a training run's work directory"
        )
    lines, torn = atomic.read_jsonl(path)
    if torn:
        log.warning(torn)
    by_epoch = {record["epoch"]: record for record in lines}
    if not by_epoch:
        raise ValueError(f"{path}: empty, no epoch was recorded")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def read_dynamics(workdir: Path) -> dict[int, dict[str, np.ndarray]]:
    """Per-slice dynamics of every recorded epoch, by epoch."""
    epochs = {}
    for path in sorted((workdir / DYNAMICS_DIR).glob("epoch_*.npz")):
        with np.load(path) as arrays:
            epochs[int(path.stem.removeprefix("epoch_"))] = dict(arrays)
    return epochs


def read_rounds(workdir: Path) -> dict[int, dict[str, np.ndarray]]:
    """Per-slice dynamics of the cleansing rounds (epochs whose file holds `ROUND_ARRAYS`)."""
    return {e: arrays for e, arrays in read_dynamics(workdir).items() if "lfm_input" in arrays}


def keep_records_before(workdir: Path, epoch: int) -> None:
    """Drop the records of `epoch` and later from the run folder (metrics.jsonl lines and
    dynamics files), which a resumed run writes again: a run records an epoch before its
    checkpoint, and may be killed in between. A torn last line of metrics.jsonl (a run
    killed while writing it) is dropped too; both are said in the log."""
    path = workdir / METRICS_FILE
    if path.is_file():
        lines, torn = atomic.read_jsonl(path)
        if torn:
            log.warning(torn)
        kept = [line for line in lines if line["epoch"] < epoch]
        if len(kept) < len(lines):
            log.info(
                "%s: dropped the records of epoch %d on (%d), which this run trains again",
                path,
                epoch,
                len(lines) - len(kept),
            )
        if torn or len(kept) < len(lines):
            atomic.write_text(path, "".join(json.dumps(line) + "\n" for line in kept))
    for dynamics in sorted((workdir / DYNAMICS_DIR).glob("epoch_*.npz")):
        if int(dynamics.stem.removeprefix("epoch_")) >= epoch:
            dynamics.unlink()
