"""A trained run's model, for inference: `load_trained(workdir)`.

The architecture comes from the run's `model.json` and the weights from its latest checkpoint;
no optimizer is built and nothing of the training loop is imported, so `predict`, `evaluate`
and `report` need only the run folder. Labels are computed data-parallel over this process's
devices: the batch is split over a ('data',) mesh, the weights replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from selfcleanse_jax.checkpoint import Checkpointer
from selfcleanse_jax.config import with_defaults
from selfcleanse_jax.data.preprocess import PreprocessSettings
from selfcleanse_jax.models.unet import (
    UNetConfig,
    abstract_model,
    class_probabilities,
    model_graphdefs,
)


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """A run folder's `config.json`, with the keys it lacks at their defaults."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: not found (is {workdir} the workdir of a training run?)")
    try:
        return with_defaults(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error


def _saved_shapes(params: Any) -> tuple[int, int]:
    """(in_channels, num_classes) read from saved parameters (first conv, head)."""
    head = np.shape(jax.tree.leaves(params["head"]["kernel"])[0])
    encoders = params["encoders"]
    first = (
        encoders[0] if isinstance(encoders, list | tuple) else encoders.get("0", encoders.get(0))
    )
    in_channels = np.shape(jax.tree.leaves(first["conv1"]["kernel"])[0])[-2]
    return int(in_channels), int(head[-1])


def _model_config(workdir: Path, config: ml_collections.ConfigDict, params: Any) -> UNetConfig:
    """The run's architecture: its `model.json`, or for a run older than that record, its
    config's model settings with the channel counts of its saved parameters."""
    recorded = UNetConfig.load(workdir)
    if recorded is not None:
        return recorded
    return UNetConfig.from_config(config.model, *_saved_shapes(params))


def _fill(template: nnx.State, saved: Any) -> nnx.State:
    """`template` (abstract, filled in place) with the saved arrays, as host arrays."""
    pure = jax.tree.map(
        lambda x: x["value"] if isinstance(x, dict) else x,
        saved,
        is_leaf=lambda x: isinstance(x, dict) and set(x) == {"value"},
    )
    nnx.replace_by_pure_dict(template, pure)
    return jax.tree.map(np.asarray, template)


@dataclasses.dataclass
class TrainedModel:
    """A run's config, its U-Net's architecture and its weights (latest checkpoint)."""

    config: ml_collections.ConfigDict
    model_config: UNetConfig
    params: nnx.State
    batch_stats: nnx.State
    epoch: int  # the epoch the checkpoint was taken in (at its end, or inside it)

    @property
    def num_classes(self) -> int:
        return self.model_config.num_classes

    @functools.cached_property
    def preprocess(self) -> PreprocessSettings:
        """How training prepared its cases; a run that recorded no modality is MRI."""
        return PreprocessSettings.from_config(self.config, "mri")

    @functools.cached_property
    def _mesh(self) -> jax.sharding.Mesh:
        devices = jax.local_devices()
        return jax.make_mesh((len(devices),), ("data",), devices=devices)

    @functools.cached_property
    def _weights(self) -> tuple[nnx.State, nnx.State]:
        """The weights replicated over the mesh, placed once."""
        return jax.device_put((self.params, self.batch_stats), NamedSharding(self._mesh, P()))

    @functools.cached_property
    def _labels(self):
        graphdef = model_graphdefs(self.model_config)[1]  # eval mode: running BatchNorm stats

        @functools.partial(
            jax.jit,
            static_argnames="flip",
            out_shardings=NamedSharding(self._mesh, P("data")),
            compiler_options=self.model_config.compiler_options(),
        )
        def labels(weights, images, flip):
            model = nnx.merge(graphdef, *weights)
            scores = class_probabilities(model, images, flip=True) if flip else model(images)
            return jnp.argmax(scores, axis=-1).astype(jnp.uint8)

        return labels

    def labels(self, images: np.ndarray, flip: bool = False) -> np.ndarray:
        """Predicted labels (N, H, W) uint8 of images (N, H, W, C); with `flip`, those of the
        softmax averaged with that of the mirrored images. In batches of the run's
        `train.eval_batch_size`, each padded to it (one compiled shape) and split over the
        devices."""
        devices = self._mesh.size
        size = -(-self.config.train.eval_batch_size // devices) * devices
        rows = NamedSharding(self._mesh, P("data"))
        out = []
        for start in range(0, len(images), size):
            batch = np.asarray(images[start : start + size])
            padded = np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])
            labels = self._labels(self._weights, jax.device_put(padded, rows), flip)
            out.append(np.asarray(labels)[: len(batch)])
        return np.concatenate(out)


def load_trained(workdir: str | Path) -> TrainedModel:
    """The model of a training run's latest checkpoint.

    Raises a one-line ValueError naming the path when the workdir has no config.json or no
    checkpoint. Only the parameters and batch statistics are used: a checkpoint without an
    optimizer state loads as well.
    """
    workdir = Path(workdir)
    config = load_config(workdir)
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir():
        raise ValueError(f"{checkpoints}: no checkpoint found")
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ValueError(f"{checkpoints}: no checkpoint found")
        epoch = checkpointer.read_meta(step)["epoch"]
        saved = checkpointer.restore_state(step)
    finally:
        checkpointer.close()
    model_config = _model_config(workdir, config, saved["params"])
    _, _, params, batch_stats = abstract_model(model_config)
    return TrainedModel(
        config=config,
        model_config=model_config,
        params=_fill(params, saved["params"]),
        batch_stats=_fill(batch_stats, saved.get("batch_stats") or {}),
        epoch=epoch,
    )
