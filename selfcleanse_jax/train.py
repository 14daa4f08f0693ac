"""The training loop: warm-up, a filtering/cleansing round every epoch after it, joint supervision.

`run(config, workdir)` trains one model and returns a summary; per-epoch metrics go to
`workdir/metrics.jsonl` (one JSON object per line, written by process 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from selfcleanse_jax import atomic, board, distributed, metrics, records, settings
from selfcleanse_jax.augment import AugmentConfig
from selfcleanse_jax.checkpoint import CHECKPOINTS, UNREADABLE, Checkpointer
from selfcleanse_jax.cleansing.flags import FlagSettings, flag_round
from selfcleanse_jax.cleansing.gmm import separation, split_clean_noisy
from selfcleanse_jax.cleansing.lcm import (
    LCMSettings,
    calibrated_classes,
    calibrated_offsets,
    unlearnt_structures,
)
from selfcleanse_jax.cleansing.warmup import saturated
from selfcleanse_jax.config import warmup_epochs, with_defaults
from selfcleanse_jax.data import pipeline
from selfcleanse_jax.data.cases import SliceTable
from selfcleanse_jax.data.loading import Dataset, load_dataset
from selfcleanse_jax.models.unet import MODEL_FILE, UNetConfig
from selfcleanse_jax.noise import NoiseRealisation, apply_noise, resolve_rate
from selfcleanse_jax.steps import RoundForward, StepConfig, Steps, TrainState, batch_rows

log = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """The run stopped on non-finite losses or gradients (`train.nonfinite`)."""


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT after saving a checkpoint at the step it had
    finished; the same command resumes it."""


@contextlib.contextmanager
def stop_signals(requested: list[str]) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT do not end the process but append their name to
    `requested`, for the loop to finish its step, save and stop; a second signal acts as it
    would outside. Only in the main thread, where Python allows signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}

    def ask_to_stop(number: int, frame) -> None:
        for other, handler in previous.items():
            signal.signal(other, handler)
        name = signal.Signals(number).name
        requested.append(name)
        log.warning("%s: finishing this step, then saving and stopping (again: stop now)", name)

    for number in previous:
        signal.signal(number, ask_to_stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float16 one-hot targets; IGNORE_INDEX (and any value >= num_classes) gives all zeros."""
    table = np.concatenate(
        [
            np.eye(num_classes, dtype=np.float16),
            np.zeros((256 - num_classes, num_classes), np.float16),
        ]
    )
    return table[labels]


@dataclasses.dataclass
class TargetBank:
    """What each training sample is supervised with, updated by every cleansing round."""

    given: np.ndarray  # (N, H, W) uint8, the labels as given (possibly noisy)
    targets: np.ndarray  # (N, H, W) uint8, the current training targets
    weights: np.ndarray  # (N,) float32, per-sample loss weights
    clean_prob: np.ndarray  # (N,) float32, w_i from the last filtering round
    flagged: np.ndarray  # (N,) bool, flagged noisy in the last round
    soft: np.ndarray | None = None  # (N, H, W, K) float16 soft targets, when enabled

    @classmethod
    def from_labels(cls, labels: np.ndarray, num_classes: int, soft: bool) -> TargetBank:
        n = len(labels)
        bank = cls(
            given=labels,
            targets=labels.copy(),
            weights=np.ones(n, np.float32),
            clean_prob=np.ones(n, np.float32),
            flagged=np.zeros(n, bool),
        )
        if soft:
            bank.soft = _one_hot(labels, num_classes)
        return bank

    def reset(self) -> None:
        """Every sample back to its given label with weight 1."""
        self.targets[...] = self.given
        self.weights[...] = 1.0
        if self.soft is not None:
            self.soft[...] = _one_hot(self.given, self.soft.shape[-1])

    def arrays(self, table: SliceTable) -> dict[str, np.ndarray]:
        """Per-sample training inputs by name (views, so later bank updates show through),
        with the samples' stable ids."""
        arrays = {
            "image": table.images,
            "target": self.targets,
            "weight": self.weights,
            "idx": table.idx,
        }
        if self.soft is not None:
            arrays["soft_target"] = self.soft
        return arrays

    def batch(self, table: SliceTable, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[rows] for name, array in self.arrays(table).items()}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay to 1% of the peak rate."""

    learning_rate: float
    weight_decay: float
    warmup_steps: int
    total_steps: int

    def build(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.learning_rate,
            warmup_steps=min(self.warmup_steps, max(self.total_steps // 10, 1)),
            decay_steps=max(self.total_steps, 2),
            end_value=self.learning_rate * 0.01,
        )
        return optax.adamw(schedule, weight_decay=self.weight_decay)


@functools.lru_cache(maxsize=4)
def compiled_steps(
    model: UNetConfig, steps: StepConfig, optimizer: OptimizerConfig, parallel: str
) -> Steps:
    """Steps for these settings, shared by runs that differ only in method, seed or data,
    so that they compile once per process."""
    return Steps(model, optimizer.build(), steps, parallel)


def step_config(config: ml_collections.ConfigDict, num_classes: int) -> StepConfig:
    c = config.cleanse
    return StepConfig(
        num_classes=num_classes,
        dice_weight=config.train.dice_weight,
        soft_targets=c.soft_targets,
        augment=AugmentConfig(**config.augment.to_dict()),
        lcm=LCMSettings(
            kappa=c.kappa,
            fallback=c.fallback,
            band=c.band,
            edge_ignore=c.edge_ignore,
            temperature=c.temperature if c.soft_targets else None,
            morph_radius=c.morph_radius,
        ),
        flip_average=c.flip_average,
        teacher_decay=c.teacher_decay,
        lfm_dice_weight=None if c.lfm_dice_weight < 0 else c.lfm_dice_weight,
        lfm_loss=c.lfm_loss,
    )


def evaluate_losses(
    steps: Steps,
    state: TrainState,
    table: SliceTable,
    labels: np.ndarray,
    batch_size: int,
    teacher: bool = False,
    class_offset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels and per-sample losses against `labels` for every slice, no augmentation
    (with `teacher`: the EMA teacher's, when the run keeps one; with `class_offset` (K,): of
    the log-probabilities lowered by it, `eval_step`)."""
    predictions, losses = [], []
    for idx in batch_rows(len(table), batch_size):
        batch = {"image": table.images[idx], "target": labels[idx]}
        if class_offset is not None:
            batch["class_offset"] = np.tile(class_offset, (len(idx), 1))
        pred, loss = steps.evaluate(state, batch, teacher, pad_to=batch_size)
        predictions.append(pred)
        losses.append(loss)
    return np.concatenate(jax.device_get(predictions)), np.concatenate(jax.device_get(losses))


def volume_dice(
    steps: Steps, state: TrainState, table: SliceTable, num_classes: int, batch_size: int
) -> np.ndarray:
    """Volume-level Dice per foreground class, averaged over the test cases."""
    predictions, _ = evaluate_losses(steps, state, table, table.labels, batch_size)
    per_case = [
        metrics.dice_per_class(predictions[members], table.labels[members], num_classes)
        for members in (table.volume_slices(c) for c in range(len(table.case_names)))
    ]
    return np.mean(per_case, axis=0)


def run_noise(config: ml_collections.ConfigDict, dataset: Dataset) -> NoiseRealisation:
    """The noise realisation a run with `config` trains on (its given labels)."""
    return apply_noise(
        dataset.train.labels,
        config.noise.kind,
        resolve_rate(config.noise.kind, config.noise.rate),
        config.noise.seed,
        dataset.num_classes,
        params=config.noise.params.to_dict(),
        ids=dataset.train.idx,
        class_names=dataset.class_names,
    )


class Trainer:
    """One training run of one method on one dataset and noise realisation."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str | Path, dataset: Dataset | None = None
    ):
        settings.check(config)
        self.config = config
        self.workdir = Path(workdir)
        self.dataset = load_dataset(config) if dataset is None else dataset
        self.num_classes = self.dataset.num_classes
        train = self.dataset.train
        self.noise = run_noise(config, self.dataset)
        if config.cleanse.lfm_oracle and config.noise.kind == "none":
            raise ValueError("cleanse.lfm_oracle needs simulated noise (noise.kind is none)")
        if config.method == "oracle" and config.noise.kind == "none":
            log.info("oracle with noise.kind=none trains on the given labels")
        supervision = train.labels if config.method == "oracle" else self.noise.noisy_labels
        self.bank = TargetBank.from_labels(
            supervision, self.num_classes, config.cleanse.soft_targets
        )
        # The classes a calibration may shift, from the given labels' sizes (fixed per run).
        cleanse = config.cleanse
        self.calibrated = (
            calibrated_classes(self.bank.given, self.num_classes, cleanse.calibrate_min_share)
            if cleanse.calibrate or cleanse.calibrate_lfm
            else None
        )
        self.loss_history: list[np.ndarray] = []
        self.lfm_input: np.ndarray | None = None  # the last round's GMM input (normalised)
        # The last round's per-slice Dice of the model's prediction to the given label.
        self.prediction_given_dice: np.ndarray | None = None
        # Where the input pipeline stands: {"epoch", "step", "iterator" (grain state)}.
        self.data_state: dict | None = None

        batch_size = config.train.batch_size  # the global batch, shared by the processes
        if batch_size % jax.process_count():
            raise ValueError(
                f"train.batch_size {batch_size} is not divisible by the "
                f"{jax.process_count()} processes"
            )
        self.steps_per_epoch = len(train) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(train)} training slices are fewer than one batch of {batch_size}"
            )
        optimizer = OptimizerConfig(
            learning_rate=config.train.learning_rate,
            weight_decay=config.train.weight_decay,
            warmup_steps=config.train.warmup_steps,
            total_steps=self.steps_per_epoch * config.train.epochs,
        )
        self.steps = compiled_steps(
            UNetConfig.from_config(config.model, train.images.shape[-1], self.num_classes),
            step_config(config, self.num_classes),
            optimizer,
            config.parallel,
        )
        if batch_size % self.steps.num_devices:
            raise ValueError(
                f"train.batch_size {batch_size} is not divisible by the "
                f"{self.steps.num_devices} devices"
            )
        self.state = self.steps.init_state(config.seed)
        self.warmup = warmup_epochs(config)
        self.adaptive = bool(config.cleanse.adaptive_warmup)
        # The first epoch with a cleansing round; with an adaptive warm-up, decided on the way.
        self.cleansing_from: int | None = None if self.adaptive else self.warmup
        self.train_dice_history: list[list[float]] = []  # per warm-up epoch, per class
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient
        self.stop_requested: list[str] = []  # the signals that asked the run to stop
        # The epoch under way: its record so far and its slices' training losses so far.
        self.epoch_record: dict = {}
        self.epoch_losses = np.full(len(train), np.nan, np.float32)
        self.board: board.Board | None = None  # TensorBoard, opened by `train_epochs`
        # Runs trained together in one process share a lock and save one at a time, each save
        # written before the next begins: orbax's managers do not save side by side.
        self.save_lock: threading.Lock | None = None

    # -- one cleansing round -------------------------------------------------------------
    def cleansing_round(self, epoch: int) -> dict:
        """LFM on the given labels, then (selfcleanse) LCM for the flagged samples."""
        c = self.config.cleanse
        train = self.dataset.train
        # The round's one forward pass; what follows is derived from its logits on device.
        forward = self.steps.round_forward(
            self.state, train.images, self.config.train.eval_batch_size, c.round_logits_gb
        )
        # The margin areas, once per round, when an offset is asked for.
        areas = functools.cache(lambda: self.steps.from_round("areas", forward, {}))
        lfm_offsets = None
        if c.calibrate_lfm:
            # Calibrated on the slices the round before trusted (at the first round, all).
            lfm_offsets = self.class_offsets(areas(), np.flatnonzero(~self.bank.flagged))
        lfm_batch = {"target": self.bank.given}
        if lfm_offsets is not None:
            lfm_batch["class_offset"] = np.tile(lfm_offsets, (len(train), 1))
        predictions, losses = self.steps.from_round("lfm", forward, lfm_batch)
        self.loss_history = (self.loss_history + [losses])[-c.loss_window :]
        result = split_clean_noisy(
            np.mean(self.loss_history, axis=0),
            backend=c.gmm_backend,
            reg_covar=c.reg_covar,
            normalise=c.lfm_normalise,
        )
        if c.lfm_oracle:
            # A diagnostic: the flags the LFM would give if it were never wrong.
            truth = np.where(self.noise.is_noisy, 0.0, 1.0).astype(np.float32)
            result = dataclasses.replace(result, clean_prob=truth)
        self.lfm_input = result.normalised
        # How closely the model reproduces each given label: memorisation, per slice.
        self.prediction_given_dice = metrics.slice_dice(
            predictions, self.bank.given, self.num_classes
        ).astype(np.float32)  # as a checkpoint keeps it, so a resumed run records the same
        if result.message:
            log.warning("epoch %d: %s", epoch, result.message)
        bank = self.bank
        bank.reset()
        unlearnt = unlearnt_structures(predictions, bank.given, self.num_classes, c.unlearnt_below)
        decided = flag_round(
            result.clean_prob,
            bank.clean_prob,
            separation(result.fit),
            degenerate=bool(result.message),
            unlearnt=unlearnt,
            class_names=self.dataset.class_names,
            settings=FlagSettings.from_config(c),
            filtering=self.config.method == "filter",
            ramp=min(1.0, (epoch - self.cleansing_from + 1) / max(c.ramp_epochs, 1)),
            epoch=epoch,
        )
        bank.clean_prob[...] = decided.clean_prob
        bank.flagged[...] = decided.flagged
        bank.weights[...] = decided.weights
        view = decided.view
        flagged = np.flatnonzero(bank.flagged)
        offsets = None
        if self.config.method == "selfcleanse":
            if c.calibrate and len(flagged):
                trusted = np.flatnonzero(~bank.flagged & ~unlearnt.any(axis=1))
                offsets = self.class_offsets(areas(), trusted)
            self.cleanse_flagged(forward, flagged, offsets)
        distributed.check_same("target banks", bank.targets, bank.weights, bank.flagged)
        if self.board:
            labels = {"clean": train.labels, "given": bank.given, "target": bank.targets}
            self.board.cleansing_round(
                epoch, result.normalised, train.images, {**labels, "prediction": predictions}
            )
        record = {
            "flagged": int(len(flagged)),
            "gmm_means": [float(m) for m in np.asarray(result.fit.means)],
            "gmm_variances": [float(v) for v in np.asarray(result.fit.variances)],
            "gmm_weights": [float(w) for w in np.asarray(result.fit.weights)],
            "gmm_degenerate": bool(result.fit.degenerate),
            "lfm_view": view,
        }
        if offsets is not None:
            record["class_offsets"] = [float(b) for b in offsets]
        if lfm_offsets is not None:
            record["lfm_class_offsets"] = [float(b) for b in lfm_offsets]
        if self.config.noise.kind != "none":
            record["detection"] = metrics.detection_metrics(
                self.noise.is_noisy, 1.0 - bank.clean_prob, bank.flagged
            )
            if self.config.method == "selfcleanse":
                # None when the round flags nothing: there are no cleansed labels to score.
                record["pseudo_label_dice"] = None
            if len(flagged) and self.config.method == "selfcleanse":
                clean = train.labels[flagged]
                record["pseudo_label_dice"] = {
                    "given": metrics.label_dice(bank.given[flagged], clean, self.num_classes),
                    "cleansed": metrics.label_dice(bank.targets[flagged], clean, self.num_classes),
                }
        return record

    def cleanse_flagged(
        self, forward: RoundForward, flagged: np.ndarray, offsets: np.ndarray | None
    ) -> None:
        """The LCM's targets for the `flagged` rows (sorted), from the round's `forward`
        pass, written into the bank."""
        if not len(flagged):
            return
        bank = self.bank
        batch = {"target": bank.given, "clean_prob": bank.clean_prob}
        if offsets is not None:
            batch["class_offset"] = np.tile(offsets, (len(bank.given), 1))
        hard, soft = self.steps.from_round("cleanse", forward, batch, only=flagged)
        bank.targets[flagged] = hard
        if soft is not None:
            bank.soft[flagged] = soft.astype(np.float16)

    def class_offsets(self, areas: np.ndarray, trusted: np.ndarray) -> np.ndarray:
        """Class offsets (K,) calibrated on the `trusted` rows of the training set, from
        every row's margin `areas` (`lcm.calibrated_offsets`)."""
        return calibrated_offsets(
            areas[trusted],
            self.bank.given[trusted],
            self.num_classes,
            self.config.cleanse.calibrate_estimate,
            self.calibrated,
        )

    # -- the warm-up ---------------------------------------------------------------------
    def cleansing_begun(self, epoch: int) -> bool:
        """Whether `epoch` starts with a cleansing round (the warm-up is over).

        A fixed warm-up lasts `cleanse.warmup_epochs`; an adaptive one at least that, and
        then until every class's training Dice has saturated (`cleansing.warmup.saturated`)
        or `cleanse.warmup_max_fraction` of the epochs have passed.
        """
        if self.cleansing_from is not None:
            return epoch >= self.cleansing_from
        if epoch < self.warmup:
            return False
        c = self.config.cleanse
        longest = max(self.warmup, round(c.warmup_max_fraction * self.config.train.epochs))
        history = np.asarray(self.train_dice_history, float)
        done = saturated(history, c.saturation) if len(history) else np.zeros(0, bool)
        if len(history) and done.all():
            log.info("epoch %d: every class's training Dice has saturated; cleansing begins", epoch)
        elif epoch >= longest:
            waiting = [n for n, d in zip(self.dataset.class_names[1:], done, strict=True) if not d]
            log.warning(
                "epoch %d: the warm-up reached its longest (%d epochs) before %s saturated; "
                "cleansing begins",
                epoch,
                longest,
                ", ".join(waiting) or "the training Dice",
            )
        else:
            return False
        self.cleansing_from = epoch
        return True

    def track_warmup(self) -> dict:
        """The training Dice per class against the given labels, for the adaptive warm-up."""
        predictions, _ = evaluate_losses(
            self.steps,
            self.state,
            self.dataset.train,
            self.bank.given,
            self.config.train.eval_batch_size,
        )
        dice = metrics.dice_per_class(predictions, self.bank.given, self.num_classes)
        self.train_dice_history.append([float(d) for d in dice])
        done = saturated(np.asarray(self.train_dice_history), self.config.cleanse.saturation)
        return {
            "train_dice_per_class": self.dataset.per_class(dice),
            "saturated": {
                name: bool(d) for name, d in zip(self.dataset.class_names[1:], done, strict=True)
            },
        }

    # -- the loop --------------------------------------------------------------------------
    def epoch_dataset(
        self, epoch: int, arrays: Mapping[str, np.ndarray] | None = None
    ) -> grain.MapDataset:
        """This process's training batches of `epoch`, read from the bank as it is now (or
        from `arrays`, rows in the bank's form)."""
        source = pipeline.ArraySource(
            self.bank.arrays(self.dataset.train) if arrays is None else arrays
        )
        per_process = self.config.train.batch_size // jax.process_count()
        return pipeline.epoch_dataset(source, per_process, self.config.seed, epoch)

    def dice_weight(self, epoch: int) -> float:
        """The Dice term's weight in this epoch's training loss: `cleanse.warmup_dice_weight`
        during a cleansing method's warm-up when set (>= 0), else `train.dice_weight`."""
        cleanses = self.config.method in ("filter", "selfcleanse")
        during_warmup = cleanses and not self.cleansing_begun(epoch)
        warmup_weight = self.config.cleanse.warmup_dice_weight
        if during_warmup and warmup_weight >= 0:
            return float(warmup_weight)
        return float(self.config.train.dice_weight)

    def inside(self, epoch: int) -> bool:
        """Whether the input pipeline stands inside `epoch` with some of its steps done."""
        saved = self.data_state
        return bool(saved and saved["epoch"] == epoch and saved["step"] < self.steps_per_epoch)

    def train_epoch(self, epoch: int, checkpointer: Checkpointer | None = None) -> np.ndarray:
        """One pass over the training slices; each slice's training loss (NaN if not seen).

        Continues from `data_state` when it stands inside this epoch (a mid-epoch resume, the
        losses of its earlier steps in `epoch_losses`); a finished epoch's state starts the
        epoch afresh. With a checkpointer, saves after a step when its interval is due.
        """
        resumed = self.data_state if self.inside(epoch) else None
        if resumed is None:
            self.epoch_losses = np.full(len(self.dataset.train), np.nan, np.float32)
        step = resumed["step"] if resumed else 0
        batches = pipeline.epoch_iterator(
            self.epoch_dataset(epoch),
            self.config.train.data_workers,
            resumed["iterator"] if resumed else None,
        )
        key = jax.random.key(self.config.seed)
        dice_weight = self.dice_weight(epoch)
        seen, losses = [], []
        unchecked = None  # the last step's finite flag, read once the next step is queued
        for batch in batches:
            rows = batch.pop("row")
            batch["dice_weight"] = np.full(len(rows), dice_weight, np.float32)
            global_step = epoch * self.steps_per_epoch + step
            step_key = jax.random.fold_in(key, global_step)
            self.state, loss, finite = self.steps.train(self.state, batch, step_key)
            step += 1
            self.data_state = {"epoch": epoch, "step": step, "iterator": batches.get_state()}
            seen.append(rows)
            losses.append(loss)
            if unchecked is not None:
                self.count_nonfinite(*unchecked)
            unchecked = (finite, global_step + 1, epoch)
            # A save due at the epoch's last step waits for the epoch's record (`run`).
            if (
                checkpointer
                and step < self.steps_per_epoch
                and (self.stop_requested or checkpointer.due(global_step + 1))
            ):
                self.count_nonfinite(*unchecked)
                unchecked = None
                self._collect_losses(seen, losses)
                self.save(checkpointer, epoch)
                self.stop_if_requested(checkpointer)
        if unchecked is not None:
            self.count_nonfinite(*unchecked)
        self._collect_losses(seen, losses)
        return self.epoch_losses

    def _collect_losses(self, seen: list[np.ndarray], losses: list[jax.Array]) -> None:
        """Move the losses of the steps so far from the device into `epoch_losses` (every
        process's, so that each holds them all)."""
        if seen:
            seen, losses = distributed.gather((seen, losses))
            self.epoch_losses[np.concatenate(seen)] = np.concatenate(losses)
            seen.clear()
            losses.clear()

    def count_nonfinite(self, finite: jax.Array, step: int, epoch: int) -> None:
        """Count a step that the train step skipped for a non-finite loss or gradient, and
        stop the run (NonFiniteError) as `train.nonfinite` and `train.nonfinite_limit` say."""
        if bool(finite):
            return
        self.nonfinite_steps += 1
        train = self.config.train
        where = f"step {step} (epoch {epoch})"
        if train.nonfinite == "stop":
            raise NonFiniteError(
                f"{where}: non-finite loss or gradient; train.nonfinite=stop ends the run "
                "(its last checkpoint is kept)"
            )
        log.warning(
            "%s: non-finite loss or gradient, update skipped (%d so far)",
            where,
            self.nonfinite_steps,
        )
        limit = train.nonfinite_limit
        if self.nonfinite_steps > limit:
            raise NonFiniteError(
                f"{where}: {self.nonfinite_steps} steps skipped for non-finite losses or "
                f"gradients, more than train.nonfinite_limit ({limit}); the run stops (its "
                "last checkpoint is kept)"
            )

    def record_dynamics(self, epoch: int, train_loss: np.ndarray, cleansed: bool) -> None:
        """Per-slice values of this epoch to `WORKDIR/dynamics/epoch_NNNN.npz`."""
        arrays = {
            "idx": self.dataset.train.idx,
            "train_loss": train_loss,
            "weight": self.bank.weights,
        }
        if cleansed:
            arrays.update(
                lfm_loss=self.loss_history[-1],
                lfm_input=self.lfm_input,
                clean_prob=self.bank.clean_prob,
                flagged=self.bank.flagged,
                prediction_given_dice=self.prediction_given_dice,
            )
        records.write_dynamics(self.workdir, epoch, arrays)

    def evaluate_test(self) -> dict:
        dice = volume_dice(
            self.steps,
            self.state,
            self.dataset.test,
            self.num_classes,
            self.config.train.eval_batch_size,
        )
        return {
            "test_dice": float(np.mean(dice)),
            "test_dice_per_class": self.dataset.per_class(dice),
        }

    def _bank_arrays(self) -> dict[str, np.ndarray]:
        """The bank and the LFM's loss history as fixed-shape arrays, for checkpoints."""
        bank = self.bank
        history = np.full((self.config.cleanse.loss_window, len(bank.given)), np.nan, np.float32)
        if self.loss_history:
            history[-len(self.loss_history) :] = self.loss_history
        arrays = {
            "targets": bank.targets,
            "weights": bank.weights,
            "clean_prob": bank.clean_prob,
            "flagged": bank.flagged,
            "loss_history": history,
        }
        return arrays if bank.soft is None else {**arrays, "soft": bank.soft}

    def _partial_arrays(self) -> dict[str, np.ndarray]:
        """Per-sample arrays of the epoch under way, for checkpoints taken inside it."""
        missing = np.full(len(self.dataset.train), np.nan, np.float32)
        return {
            "train_loss": self.epoch_losses,
            "lfm_input": missing if self.lfm_input is None else self.lfm_input,
            "prediction_given_dice": (
                missing if self.prediction_given_dice is None else self.prediction_given_dice
            ),
        }

    def save(self, checkpointer: Checkpointer, epoch: int) -> None:
        """Checkpoint everything that decides the rest of the run, after the last step of
        `data_state`: inside `epoch` (with the epoch's record and losses so far) or at its end
        (its record written)."""
        finished = not self.inside(epoch)
        meta = {
            "epoch": epoch,
            "epoch_finished": finished,
            "method": self.config.method,
            "cleansing_from": self.cleansing_from,
            "train_dice_history": self.train_dice_history,
            "nonfinite_steps": self.nonfinite_steps,
        }
        if not finished:
            meta["record"] = self.epoch_record
        with self.save_lock or contextlib.nullcontext():
            checkpointer.save(
                epoch * self.steps_per_epoch + self.data_state["step"],
                self.steps.get_state(self.state),
                self._bank_arrays(),
                json.loads(json.dumps(meta)),  # a copy: the record changes while it is written
                self.data_state,
                None if finished else self._partial_arrays(),
            )
            if self.save_lock:
                checkpointer.wait()

    def resume(self, checkpointer: Checkpointer) -> int:
        """Load the newest readable checkpoint in the workdir, if any; return the epoch to
        run next (the one it stands inside, or the one after the epoch it finished)."""
        latest = checkpointer.restore_latest(
            self.steps.get_state(self.state), self._bank_arrays(), self._partial_arrays()
        )
        if latest is None:
            return 0
        step, (state, bank, meta, self.data_state, partial) = latest
        epoch = meta["epoch"]
        if self.adaptive:
            self.cleansing_from = meta.get("cleansing_from")
            self.train_dice_history = meta.get("train_dice_history", [])
        self.nonfinite_steps = meta.get("nonfinite_steps", 0)
        self.state = self.steps.put_state(state)
        history = bank.pop("loss_history")
        self.loss_history = [row for row in history if not np.isnan(row).all()]
        for name, array in bank.items():
            getattr(self.bank, name)[...] = array
        finished = meta.get("epoch_finished", True)  # older runs saved at epoch ends only
        if not finished:
            self.epoch_record = meta["record"]
            self.epoch_losses = partial["train_loss"]
            self.lfm_input = partial["lfm_input"]
            self.prediction_given_dice = partial.get("prediction_given_dice")
        log.info(
            "resumed from the checkpoint of step %d in %s, %s epoch %d",
            step,
            checkpointer.directory,
            "after" if finished else "inside",
            epoch,
        )
        return epoch + 1 if finished else epoch

    def run_epoch(self, epoch: int, checkpointer: Checkpointer | None) -> dict:
        """A cleansing round (after the warm-up), an epoch of training, evaluation; the
        epoch's record. A run resumed inside the epoch continues its round's record."""
        config = self.config
        cleanses = config.method in ("filter", "selfcleanse")
        cleansing = cleanses and self.cleansing_begun(epoch)
        if not self.inside(epoch):
            self.epoch_record = {"epoch": epoch}
            if cleansing:
                self.epoch_record["cleanse"] = self.cleansing_round(epoch)
        record = self.epoch_record
        train_loss = self.train_epoch(epoch, checkpointer)
        record["train_loss"] = float(np.nanmean(train_loss))
        if self.nonfinite_steps:
            record["nonfinite_steps"] = self.nonfinite_steps
        if cleanses and self.adaptive and self.cleansing_from is None:
            record["warmup"] = self.track_warmup()
        if config.train.record_dynamics and distributed.is_main():
            self.record_dynamics(epoch, train_loss, cleansing)
        last = epoch == config.train.epochs - 1
        every = config.train.eval_every
        if last or (every and (epoch + 1) % every == 0):
            record.update(self.evaluate_test())
        return record

    def stop_if_requested(self, checkpointer: Checkpointer) -> None:
        """Raise Preempted when a signal asked the run to stop (its checkpoint just saved)."""
        if self.stop_requested:
            state = self.data_state
            raise Preempted(
                f"stopped by {self.stop_requested[0]} after step "
                f"{state['epoch'] * self.steps_per_epoch + state['step']} (epoch "
                f"{state['epoch']}), saved in {checkpointer.directory}"
            )

    def epoch_end_save_due(self, epoch: int, checkpointer: Checkpointer) -> bool:
        """Whether to checkpoint at the end of `epoch`: the last one, every
        `train.checkpoint_every` epochs, when a step or time interval is due, or when a
        signal asked the run to stop."""
        every = self.config.train.checkpoint_every
        return (
            bool(self.stop_requested)
            or epoch == self.config.train.epochs - 1
            or bool(every and (epoch + 1) % every == 0)
            or checkpointer.due((epoch + 1) * self.steps_per_epoch)
        )

    def train_epochs(self, checkpointer: Checkpointer | None, start: float) -> dict:
        """The epochs from where the workdir's checkpoint stands (`start`: the run's clock);
        each epoch's record is written, then its checkpoint when due. The last record."""
        config = self.config
        first_epoch = self.resume(checkpointer) if checkpointer else 0
        if distributed.is_main():
            records.keep_records_before(self.workdir, first_epoch)
            if config.train.tensorboard:
                self.board = board.Board(self.workdir, first_epoch, self.noise.is_noisy)
        bar = tqdm(
            range(first_epoch, config.train.epochs),
            desc=config.method,
            unit="epoch",
            leave=False,
            disable=not (config.progress and distributed.is_main()),
        )
        record: dict = {}
        for epoch in bar:
            record = self.run_epoch(epoch, checkpointer)
            record["seconds"] = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{record['train_loss']:.3f}",
                dice=f"{record.get('test_dice', float('nan')):.3f}",
            )
            if distributed.is_main():
                records.append_epoch(self.workdir, record)
            if self.board:
                self.board.epoch(record, self.epoch_losses)
            if checkpointer and self.epoch_end_save_due(epoch, checkpointer):
                self.save(checkpointer, epoch)
                self.stop_if_requested(checkpointer)
        return record

    def run(self) -> dict:
        """Train all epochs (resuming from the workdir's checkpoint when there is one).

        With checkpoints on, in a single process, SIGTERM or SIGINT stops the run after the
        step under way, with a checkpoint there: Preempted says so.
        """
        config = self.config
        if distributed.is_main():
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.noise.save(self.workdir / "noise_card.json")
            # The modality the data was normalised as, so predict prepares volumes the same way.
            saved = config.copy_and_resolve_references()
            with saved.unlocked():
                saved.data.modality = self.dataset.modality
            atomic.write_text(self.workdir / "config.json", saved.to_json(indent=1) + "\n")
            self.steps.model_config.save(self.workdir)
        checkpointer = None
        if config.train.checkpoint:
            checkpointer = Checkpointer(
                self.workdir,
                keep=config.train.checkpoint_keep,
                every_steps=config.train.checkpoint_every_steps,
                every_minutes=config.train.checkpoint_every_minutes,
            )
        start = time.perf_counter()
        # Several processes would stop at different steps; one alone stops where asked.
        stoppable = checkpointer is not None and jax.process_count() == 1
        signals = stop_signals(self.stop_requested) if stoppable else contextlib.nullcontext()
        try:
            with signals:
                record = self.train_epochs(checkpointer, start)
        finally:
            if checkpointer:
                checkpointer.close()
            if self.board:
                self.board.close()
        if not record and (self.workdir / records.METRICS_FILE).is_file():
            # Every epoch was trained and saved before: the last epoch's record is the result.
            record = records.read_metrics(self.workdir)[-1]
        if "test_dice" not in record:
            record.update(self.evaluate_test())
        summary: records.Summary = {
            "method": config.method,
            "noise": config.noise.kind,
            "test_dice": record["test_dice"],
            "test_dice_per_class": record["test_dice_per_class"],
            "cleanse": record.get("cleanse"),
            "seconds": time.perf_counter() - start,
        }
        if distributed.is_main():
            records.write_summary(self.workdir, summary)
        return summary


RECORDS = ("config.json", MODEL_FILE, "noise_card.json", records.METRICS_FILE, records.SUMMARY_FILE)
RECORD_DIRS = (CHECKPOINTS, UNREADABLE, records.DYNAMICS_DIR, "report", "eval", board.DIRECTORY)

NON_RESULT_KEYS = frozenset(
    {
        "progress",
        "data.cache_dir",
        "train.data_workers",
        "train.checkpoint",
        "train.checkpoint_every",
        "train.checkpoint_every_steps",
        "train.checkpoint_every_minutes",
        "train.checkpoint_keep",
        "train.eval_every",
        "train.record_dynamics",
        "train.nonfinite",
        "train.nonfinite_limit",
        "train.tensorboard",
        "cleanse.round_logits_gb",
        "distributed.initialize",
        "distributed.coordinator",
        "distributed.num_processes",
        "distributed.process_id",
    }
)
"""Config keys that cannot change a run's result: a folder may be asked again with others."""


def resolved_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the values it leaves to defaults filled in (the noise rate), as a run
    folder's `config.json` records it."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.noise.rate = resolve_rate(config.noise.kind, config.noise.rate)
    return resolved


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "params":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


def config_differences(saved: dict, requested: dict) -> list[str]:
    """Keys whose values differ between a run folder's config and a requested one, leaving
    out `NON_RESULT_KEYS`, a modality the request leaves to the data (empty), and the
    cleansing settings of a method that does not cleanse (baseline, oracle). A key that an
    older run's config lacks counts as its default, the value that run trained with."""
    old = _flat(with_defaults(saved).to_dict())
    new = _flat(requested)
    cleanses = new.get("method") in ("filter", "selfcleanse")
    differing = []
    for key in sorted(set(old) | set(new)):
        if key in NON_RESULT_KEYS or (key == "data.modality" and not new.get(key)):
            continue
        if key.startswith("cleanse.") and not cleanses:
            continue
        if old.get(key) != new.get(key):
            differing.append(key)
    return differing


def _clear_run(workdir: Path) -> None:
    for name in RECORDS:
        (workdir / name).unlink(missing_ok=True)
    for name in RECORD_DIRS:
        shutil.rmtree(workdir / name, ignore_errors=True)


def prepare_workdir(
    config: ml_collections.ConfigDict, workdir: Path, overwrite: bool = False
) -> dict | None:
    """Make `workdir` ready for `config`: the finished run's summary when it already holds
    this run, else None (a new or resumable run).

    A folder holding a run of another config is refused (ValueError naming the differing
    keys) unless `overwrite`, which clears its records to start afresh.
    """
    config_path = workdir / "config.json"
    if not config_path.is_file():
        return None
    try:
        saved = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        saved = {}
    differing = config_differences(saved, config.to_dict())
    if differing and not overwrite:
        shown = ", ".join(differing[:8]) + (" ..." if len(differing) > 8 else "")
        raise ValueError(
            f"{workdir}: holds a run with another config (differs in {shown}); "
            "choose a new --workdir or pass --overwrite to start afresh"
        )
    if differing:
        if distributed.is_main():
            log.info("%s: another config (%s), starting afresh", workdir, ", ".join(differing))
            _clear_run(workdir)
        return None
    summary_path = workdir / records.SUMMARY_FILE
    if summary_path.is_file():
        log.info("%s: this run has finished; reporting it from its records", workdir)
        return {**json.loads(summary_path.read_text()), "reused": True}
    return None


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    dataset: Dataset | None = None,
    overwrite: bool = False,
) -> dict:
    """Train one model as configured into `workdir`; return the summary of the final epoch.

    A folder that already holds this run's finished records is reported from them
    (`reused` true) and one holding an unfinished run resumes; one holding another config is
    refused unless `overwrite` (see `prepare_workdir`).
    """
    config = resolved_config(config)
    settings.check(config)
    distributed.initialize(config)
    workdir = Path(workdir)
    finished = prepare_workdir(config, workdir, overwrite)
    distributed.barrier("workdir prepared")  # no process writes before all have read it
    if finished is not None:
        return finished
    return Trainer(config, workdir, dataset).run()
