"""Train, evaluation and cleansing steps, written once for the global batch, and their
parallel wrappers.

Each step is a pure function of (state, batch, key). `Steps` runs them in one of two ways:

- `jit` (and `auto`): `jax.jit` with the state replicated and the batch split by rows over a
  `('data',)` mesh of the devices; XLA adds the collectives: the gradient's sum over the
  devices and BatchNorm's statistics over the whole batch. On one device it is plain jit;
  `none` is the same on the first device alone, and `shard_map` is read as `jit` (this path's
  name before it became plain jit). Its functions compile with the options of
  `model.cpu_conv_library` and `model.cpu_reduce_library` (`models/conv.py`).
- `pmap`: `jax.pmap` over the devices, state replicated with a leading device axis; the
  same step is told the axis name, sums its gradient with `lax.psum` and takes BatchNorm's
  statistics over the axis, so that it computes the same update. `jax.pmap` takes no
  compiler options: on the CPU its convolutions and reductions run on XLA's default
  libraries.

With several processes (`selfcleanse_jax.distributed`), the mesh spans every process's
devices and pmap's collectives span them too: each process feeds its own rows of the global
batch, and the outputs (per-sample losses, predictions) are gathered so that every process
holds all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from selfcleanse_jax import distributed
from selfcleanse_jax.augment import AugmentConfig, augment_batch
from selfcleanse_jax.cleansing.lcm import LCMSettings, cleanse_batch, margin_areas
from selfcleanse_jax.losses import (
    LFM_LOSSES,
    boundary_disagreement,
    label_targets,
    per_sample_loss,
)
from selfcleanse_jax.models.unet import (
    UNetConfig,
    averaged_probabilities,
    flip_logits,
    init_model,
    model_graphdefs,
)

PARALLEL_MODES = ("auto", "jit", "pmap", "none", "shard_map")
AXIS = "data"

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: Any
    teacher: nnx.State | None = None  # EMA of params, when `StepConfig.teacher_decay` > 0


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the steps (hashable, so jit can treat them as constants)."""

    num_classes: int
    dice_weight: float = 1.0
    soft_targets: bool = False
    augment: AugmentConfig = AugmentConfig()
    lcm: LCMSettings = LCMSettings()
    flip_average: bool = False
    teacher_decay: float = 0.0  # > 0: an EMA teacher gives the LFM losses and LCM probabilities
    lfm_dice_weight: float | None = None  # Dice weight of the eval (LFM) loss; None: dice_weight
    lfm_loss: str = "ce"  # the LFM's loss: mean cross-entropy, or `boundary_disagreement`

    def __post_init__(self):
        if self.lfm_loss not in LFM_LOSSES:
            raise ValueError(f"cleanse.lfm_loss must be one of {LFM_LOSSES}, got {self.lfm_loss!r}")


def batch_rows(n: int, size: int) -> Iterator[np.ndarray]:
    """The row indices of `n` rows in consecutive batches of at most `size`."""
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


def _psum(x, axis_name: str | None):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _batch_targets(batch: dict, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Targets (B, H, W, K) and pixel mask; with soft targets, (B, H, W, 2K): the soft targets
    (for cross-entropy) then the hard labels' one-hot (for Dice), resampled together."""
    targets, mask = label_targets(batch["target"], num_classes)
    if "soft_target" in batch:
        soft = batch["soft_target"].astype(jnp.float32) * mask[..., None]
        targets = jnp.concatenate([soft, targets], axis=-1)
    return targets, mask


def train_step(
    state: TrainState,
    batch: dict,
    key: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: StepConfig,
    axis_name: str | None = None,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimiser step on this device's share of the global batch.

    batch: image (B, H, W, C), target (B, H, W) int (IGNORE_INDEX ignored), optional
    soft_target (B, H, W, K), weight (B,) per-sample loss weight, idx (B,) sample ids,
    optional dice_weight (B,) (default `config.dice_weight`). The loss is
    `sum_i weight_i * loss_i / global_batch_size`. Returns the new state, the per-sample
    losses (B,) against the training targets, and whether the global loss and gradient were
    finite: when they were not, the update is skipped (the state is unchanged but for its
    step count), so a non-finite value never reaches the parameters.
    """
    targets, mask = _batch_targets(batch, config.num_classes)
    images, targets, mask = augment_batch(
        key, batch["idx"], batch["image"], targets, mask, config.augment, config.soft_targets
    )
    weights = batch["weight"].astype(jnp.float32)
    global_batch = _psum(jnp.asarray(weights.shape[0], jnp.float32), axis_name)

    dice_targets = None
    if "soft_target" in batch:  # resampled together with the hard one-hot, see _batch_targets
        targets, dice_targets = jnp.split(targets, 2, axis=-1)

    def loss_fn(params):
        # Fresh BatchStat variables at this trace level, so BatchNorm may update them.
        batch_stats = jax.tree.map(lambda v: v, state.batch_stats)
        model = nnx.merge(graphdef, params, batch_stats)
        losses = per_sample_loss(
            model(images),
            targets,
            mask,
            dice_weight=batch.get("dice_weight", config.dice_weight),
            dice_targets=dice_targets,
        )
        new_stats = nnx.state(model, nnx.BatchStat)
        return jnp.sum(weights * losses) / global_batch, (losses, new_stats)

    grads, (losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = _psum(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    teacher = state.teacher
    if teacher is not None:
        # The mean teacher's ramp: while 1 - 1/(t+1) < decay the teacher is the plain average
        # of the weights so far, so it never keeps the random initial weights' share.
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(config.teacher_decay, 1.0 - 1.0 / (step + 2.0))
        teacher = optax.incremental_update(params, teacher, 1.0 - decay)
    updated = state.replace(
        params=params, batch_stats=batch_stats, opt_state=opt_state, teacher=teacher
    )
    # A non-finite gradient leaves non-finite values in the updated state. Checking the
    # step's outputs (per-sample losses, new state) rather than the gradients keeps the
    # update's own computation, and so its result, exactly as it is without the check.
    # The new state is the same on every device and the count of non-finite losses is
    # summed over devices, so all devices keep or skip the update together.
    nonfinite_losses = _psum(jnp.sum(~jnp.isfinite(losses)), axis_name)
    finite = (nonfinite_losses == 0) & _all_finite(updated)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    return kept.replace(step=state.step + 1), losses, finite


def _all_finite(tree) -> jax.Array:
    """Whether every value of every leaf of `tree` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _model(state: TrainState, graphdef: nnx.GraphDef, teacher: bool) -> nnx.Module:
    """The model of `state`, or its EMA teacher when asked for and kept."""
    params = state.teacher if teacher and state.teacher is not None else state.params
    return nnx.merge(graphdef, params, state.batch_stats)


def evaluate_logits(
    logits: jax.Array, batch: dict, *, config: StepConfig
) -> tuple[jax.Array, jax.Array]:
    """Predicted labels (B, H, W) and per-sample losses of logits (B, H, W, K).

    The loss is against `batch["target"]` (for the LFM: the given, possibly noisy, label),
    with the Dice term weighted by `config.lfm_dice_weight` when set; with `config.lfm_loss`
    "boundary", `boundary_disagreement` takes the place of the mean cross-entropy. An
    optional `batch["class_offset"]` (B, K) is subtracted from the logits first: labels and
    losses of the model's calibrated softmax (`lcm.calibrated_offsets`).
    """
    if "class_offset" in batch:
        logits = logits - batch["class_offset"][:, None, None, :].astype(logits.dtype)
    targets, mask = label_targets(batch["target"], config.num_classes)
    dice_weight = config.dice_weight if config.lfm_dice_weight is None else config.lfm_dice_weight
    losses = per_sample_loss(logits, targets, mask, dice_weight=dice_weight)
    if config.lfm_loss == "boundary":
        cross_entropy = per_sample_loss(logits, targets, mask, dice_weight=0.0)
        losses = losses - cross_entropy + boundary_disagreement(logits, batch["target"])
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8), losses


def eval_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef: nnx.GraphDef,
    config: StepConfig,
    teacher: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Forward pass without augmentation: predicted labels (B, H, W) and per-sample losses
    against `batch["target"]` (`evaluate_logits`). With `teacher`, the EMA teacher's forward
    pass (the model's own when there is none)."""
    return evaluate_logits(_model(state, graphdef, teacher)(batch["image"]), batch, config=config)


# A cleansing round runs the network once over the training slices (`round_forward_step`)
# and keeps each batch's logits on the devices; the LFM's losses, the calibration's margin
# areas and the LCM's pseudo-labels are then derived from them, batch by batch, without
# another forward pass. Each derived step takes (logits, batch).


def round_forward_step(
    state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, config: StepConfig
) -> dict[str, jax.Array]:
    """The round's one forward pass: the EMA teacher's logits (the model's when there is
    none), and with `config.flip_average` those of the mirrored images (`flip_logits`)."""
    return flip_logits(_model(state, graphdef, teacher=True), batch["image"], config.flip_average)


def round_lfm_step(
    logits: dict[str, jax.Array], batch: dict, *, config: StepConfig
) -> tuple[jax.Array, jax.Array]:
    """The LFM's labels and losses against the given label (`evaluate_logits` of the plain,
    unmirrored logits)."""
    return evaluate_logits(logits["logits"], batch, config=config)


def round_areas_step(logits: dict[str, jax.Array], batch: dict, *, config: StepConfig) -> jax.Array:
    """`lcm.margin_areas` of the probabilities the LCM uses (B, len(OFFSET_GRID), K-1)."""
    return margin_areas(averaged_probabilities(logits))


def round_cleanse_step(
    logits: dict[str, jax.Array], batch: dict, *, config: StepConfig
) -> tuple[jax.Array, jax.Array | None]:
    """LCM on device: pseudo-labels (B, H, W) uint8 and, with soft targets on, (B, H, W, K).

    batch: target (the given label), clean_prob (B,) from the LFM and, optionally,
    class_offset (B, K) (`lcm.calibrated_offsets`).
    """
    hard, soft = cleanse_batch(
        averaged_probabilities(logits),
        batch["target"],
        batch["clean_prob"],
        config.lcm,
        batch.get("class_offset"),
    )
    return hard.astype(jnp.uint8), (soft if config.soft_targets else None)


@dataclasses.dataclass(frozen=True)
class RoundForward:
    """A round's forward pass over N slices, batch by batch: each batch's rows and its
    logits, left on the devices as `round_forward_step` placed them (N x H x W x K floats,
    twice that with `flip_average`, spread over the devices), each batch padded to `pad_to`
    rows. When the logits would not fit the budget `round_forward` was given, `logits` is
    None, and each derived step runs the forward pass of its batch again from `state` and
    `images` (the round's memory stays a batch's, at the cost of a pass per derived step)."""

    batches: list[tuple[np.ndarray, dict[str, jax.Array] | None]]
    pad_to: int
    state: TrainState
    images: np.ndarray


def _data_mesh(devices: list) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh with Auto axes: XLA places the collectives."""
    return jax.make_mesh(
        (len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def resolve_parallel(mode: str) -> str:
    """The path a `parallel` setting runs: `jit`, `pmap` or `none` (`auto` and `shard_map`
    are `jit`)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "none" and distributed.several():
        raise ValueError(
            f"parallel=none trains on one device, but this job has {jax.process_count()} "
            "processes: use jit, pmap or auto"
        )
    return "jit" if mode in ("auto", "shard_map") else mode


class Steps:
    """The steps wrapped for one parallel mode, with the state and batch placement they need.

    `train` takes this process's rows of the global batch; `evaluate` and `cleanse` take the
    whole batch (the same in every process) and return all of its rows. The global batch
    must be divisible by `num_devices`, the devices of all processes (`pad_batch` pads
    evaluation batches). `devices` are this process's devices.
    """

    def __init__(
        self,
        model_config: UNetConfig,
        tx: optax.GradientTransformation,
        config: StepConfig,
        parallel: str = "auto",
        devices: list | None = None,
    ):
        self.model_config = model_config
        self.tx = tx
        self.config = config
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.mode = resolve_parallel(parallel)
        if self.mode == "none":
            self.devices = self.devices[:1]
        # Under pmap, BatchNorm takes its statistics over the whole global batch by name.
        axis = AXIS if self.mode == "pmap" else None
        train_graphdef, eval_graphdef = model_graphdefs(
            dataclasses.replace(model_config, batch_norm_axis=axis)
        )
        self.train_graphdef = train_graphdef
        self.num_devices = len(self.devices) * jax.process_count()
        train = functools.partial(train_step, graphdef=train_graphdef, tx=tx, config=config)
        forward = {
            "eval": functools.partial(eval_step, graphdef=eval_graphdef, config=config),
            "eval_teacher": functools.partial(
                eval_step, graphdef=eval_graphdef, config=config, teacher=True
            ),
            "round": functools.partial(round_forward_step, graphdef=eval_graphdef, config=config),
        }
        derived = {
            "lfm": functools.partial(round_lfm_step, config=config),
            "areas": functools.partial(round_areas_step, config=config),
            "cleanse": functools.partial(round_cleanse_step, config=config),
        }

        if self.mode == "pmap":
            # With several processes pmap spans every process's devices (its default), and
            # its inputs are global arrays with one row per device of the job.
            several = distributed.several()
            pmap_devices = None if several else self.devices
            mesh_devices = jax.devices() if several else self.devices
            self._device_axis = NamedSharding(_data_mesh(mesh_devices), P(AXIS))
            self._train = jax.pmap(
                functools.partial(train, axis_name=AXIS),
                axis_name=AXIS,
                in_axes=(0, 0, None),
                donate_argnums=0,
                devices=pmap_devices,
            )
            self._forward = {
                name: jax.pmap(fn, axis_name=AXIS, devices=pmap_devices)
                for name, fn in (forward | derived).items()
            }
        else:
            # The steps are written for the global batch; XLA splits each over the mesh and
            # adds the collectives (the gradient's sum, BatchNorm's batch statistics).
            self.mesh = _data_mesh(jax.devices() if distributed.several() else self.devices)
            replicated, rows = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(AXIS))
            jit = functools.partial(jax.jit, compiler_options=model_config.compiler_options())
            self._train = jit(
                train,
                in_shardings=(replicated, rows, replicated),
                out_shardings=(replicated, rows, replicated),
                donate_argnums=0,
            )
            self._forward = {
                name: jit(fn, in_shardings=(replicated, rows), out_shardings=rows)
                for name, fn in forward.items()
            } | {
                name: jit(fn, in_shardings=(rows, rows), out_shardings=rows)
                for name, fn in derived.items()
            }
            # Several runs at once: the step mapped over a leading member axis.
            member_rows = NamedSharding(self.mesh, P(None, AXIS))
            self._train_members = jit(
                jax.vmap(train),
                in_shardings=(replicated, member_rows, replicated),
                out_shardings=(replicated, member_rows, replicated),
                donate_argnums=0,
            )

    def init_state(self, seed: int) -> TrainState:
        """A new model and optimiser state, placed for this mode."""
        _, _, params, batch_stats = init_model(self.model_config, seed)
        return self.put_state(
            TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                batch_stats=batch_stats,
                opt_state=self.tx.init(params),
                teacher=jax.tree.map(jnp.copy, params) if self.config.teacher_decay > 0 else None,
            )
        )

    def put_state(self, state: TrainState) -> TrainState:
        """Place a host (or single-device) state for this mode."""
        if self.mode == "pmap":
            stacked = jax.tree.map(
                lambda x: np.broadcast_to(x, (self.num_devices, *np.shape(x))),
                jax.device_get(state),
            )
            return distributed.put_replicated(stacked, self._device_axis)
        return distributed.put_replicated(state, NamedSharding(self.mesh, P()))

    def get_state(self, state: TrainState) -> TrainState:
        """The state as one copy (undoes the pmap device axis)."""
        if self.mode == "pmap":  # the first copy this process holds
            state = jax.tree.map(lambda x: x.addressable_shards[0].data[0], state)
        return jax.device_get(state)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch, placed on the devices."""
        if self.mode == "pmap":
            local = len(self.devices)
            batch = {k: v.reshape(local, -1, *v.shape[1:]) for k, v in batch.items()}
            if distributed.several():
                return {
                    k: jax.make_array_from_process_local_data(self._device_axis, v)
                    for k, v in batch.items()
                }
            return jax.device_put(batch, self._device_axis)
        rows = NamedSharding(self.mesh, P(AXIS))
        if distributed.several():
            return {k: jax.make_array_from_process_local_data(rows, v) for k, v in batch.items()}
        return jax.device_put(batch, rows)

    def put_key(self, key: jax.Array) -> jax.Array:
        """A random key as the steps take it (replicated over every process's devices)."""
        if self.mode != "pmap" and distributed.several():
            return distributed.put_replicated(key, NamedSharding(self.mesh, P()))
        return key

    def _flat(self, x: jax.Array) -> jax.Array:
        return x.reshape(-1, *x.shape[2:]) if self.mode == "pmap" else x

    def _all_rows(self, x: jax.Array) -> jax.Array | np.ndarray:
        """Every process's rows of a step's per-sample output (this process's alone holds
        them all); left on the device in a single process, so steps queue up."""
        x = self._flat(x)
        return distributed.gather(x) if distributed.several() else x

    def pad_batch(
        self, batch: dict[str, np.ndarray], pad_to: int = 0
    ) -> tuple[dict[str, np.ndarray], int]:
        """Pad the leading axis to at least `pad_to` rows and a multiple of the device count;
        return the true size. A fixed `pad_to` keeps one compiled shape for batches of any
        size (the last batch of a sweep, a round's flagged slices)."""
        if not batch:
            return batch, 0
        size = len(next(iter(batch.values())))
        padded = -(-max(size, pad_to) // self.num_devices) * self.num_devices
        if padded == size:
            return batch, size
        pad = lambda v: np.concatenate([v, np.repeat(v[-1:], padded - size, axis=0)])  # noqa: E731
        return {k: pad(v) for k, v in batch.items()}, size

    def train(
        self, state: TrainState, batch: dict[str, np.ndarray], key: jax.Array
    ) -> tuple[TrainState, jax.Array, jax.Array]:
        """The state after one step, the per-sample losses and whether the step was finite
        (`train_step`); nothing is fetched from the device, so steps queue up."""
        state, losses, finite = self._train(state, self.put_batch(batch), self.put_key(key))
        return state, self._flat(losses), finite[0] if self.mode == "pmap" else finite

    def train_members(
        self, states: TrainState, batches: dict[str, np.ndarray], keys: jax.Array
    ) -> tuple[TrainState, jax.Array, jax.Array]:
        """`train` for K runs at once: `states` stacked on a leading member axis, `batches`
        (K, B, ...), `keys` (K,); returns the stacked states, losses (K, B) and finite flags
        (K,). One process, and parallel auto, jit or none."""
        if self.mode == "pmap" or distributed.several():
            raise ValueError(
                "several runs in one program (runs.seeds) train in one process under "
                f"parallel=auto, jit or none (this job: parallel={self.mode}, "
                f"{jax.process_count()} processes)"
            )
        placed = jax.device_put(batches, NamedSharding(self.mesh, P(None, AXIS)))
        return self._train_members(states, placed, keys)

    def _rows_of(self, step: str, first, batch: dict[str, np.ndarray], pad_to: int, size: int = 0):
        """Every row of a step's per-sample outputs for `batch`, padded to `pad_to` rows
        (`pad_batch`) to run and cut back to its size (or to `size` rows, for a batch whose
        rows come in `first`: a round's logits). `first` is the step's first argument: the
        state, or a round's logits."""
        batch, rows = self.pad_batch(batch, pad_to)
        outputs = self._forward[step](first, self.put_batch(self._mine(batch)))
        return jax.tree.map(lambda x: self._all_rows(x)[: size or rows], outputs)

    def evaluate(
        self,
        state: TrainState,
        batch: dict[str, np.ndarray],
        teacher: bool = False,
        pad_to: int = 0,
    ) -> tuple[jax.Array, jax.Array]:
        """Predicted labels and per-sample losses (`eval_step`); with `teacher`, those of the
        EMA teacher."""
        return self._rows_of("eval_teacher" if teacher else "eval", state, batch, pad_to)

    def round_forward(
        self, state: TrainState, images: np.ndarray, batch_size: int, keep_gb: float = np.inf
    ) -> RoundForward:
        """A cleansing round's one forward pass over `images` (N, H, W, C), in batches of
        `batch_size`, kept on the devices (`RoundForward`) when its logits take at most
        `keep_gb` GB on this process's devices, and left to each derived step otherwise."""
        passes = 2 if self.config.flip_average else 1
        logits_gb = passes * 4 * self.config.num_classes * images[..., 0].size / 1e9
        keep = logits_gb / jax.process_count() <= keep_gb
        if not keep:
            log.info(
                "the round's logits (%.1f GB) exceed cleanse.round_logits_gb (%g): each "
                "derived step runs its own forward pass",
                logits_gb,
                keep_gb,
            )
        batches = [
            (rows, self._round_logits(state, images[rows], batch_size) if keep else None)
            for rows in batch_rows(len(images), batch_size)
        ]
        return RoundForward(batches, batch_size, state, images)

    def _round_logits(
        self, state: TrainState, images: np.ndarray, pad_to: int
    ) -> dict[str, jax.Array]:
        batch, _ = self.pad_batch({"image": images}, pad_to)
        return self._forward["round"](state, self.put_batch(self._mine(batch)))

    def from_round(
        self,
        step: str,
        forward: RoundForward,
        per_row: dict[str, np.ndarray],
        only: np.ndarray | None = None,
    ):
        """A derived step's outputs ("lfm": `round_lfm_step`, "areas": `round_areas_step`,
        "cleanse": `round_cleanse_step`) for every row of `forward`, or for the rows `only`
        (sorted) in their order, fetched in one transfer. `per_row` holds the step's batch
        inputs for all N rows; batches without a wanted row are skipped."""
        wanted = np.ones(len(forward.images), bool)
        if only is not None:
            wanted[:] = False
            wanted[only] = True
        outputs, done = [], []
        for rows, logits in forward.batches:
            if not wanted[rows].any():
                continue
            if logits is None:
                logits = self._round_logits(forward.state, forward.images[rows], forward.pad_to)
            batch = {k: v[rows] for k, v in per_row.items()}
            outputs.append(self._rows_of(step, logits, batch, forward.pad_to, len(rows)))
            done.append(rows)
        if not outputs:
            return None
        merged = jax.tree.map(lambda *parts: np.concatenate(parts), *jax.device_get(outputs))
        if only is None:
            return merged
        position = np.searchsorted(np.concatenate(done), only)
        return jax.tree.map(lambda x: x[position], merged)

    @staticmethod
    def _mine(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's rows of a batch that every process holds whole."""
        if not batch or not distributed.several():
            return batch
        rows = distributed.my_rows(len(next(iter(batch.values()))))
        return {k: v[rows] for k, v in batch.items()}
