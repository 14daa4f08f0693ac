"""A 2D U-Net in Flax NNX: configurable depth, width, normalisation and compute dtype."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from selfcleanse_jax import atomic
from selfcleanse_jax.models.conv import compiler_options, split_weight_grad_conv

MODEL_FILE = "model.json"
"""A run folder's record of its U-Net's architecture: `UNetConfig`'s fields as JSON."""

NORMS = ("instance", "group", "batch")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net.

    `depth` counts down-samplings; level `l` has `min(base_width * 2**l, max_width)` channels,
    so the defaults give 32, 64, 128, 256, 512.
    """

    in_channels: int = 1
    num_classes: int = 4
    depth: int = 4
    base_width: int = 32
    max_width: int = 512
    norm: str = "instance"
    group_size: int = 8
    compute_dtype: str = "float32"
    weight_grad_parts: int = 1  # 3x3 weight gradients summed over parts of the batch (conv.py)
    cpu_conv_library: str = "eigen"  # what runs the convolutions on the CPU backend (conv.py)
    cpu_reduce_library: str = "ynnpack"  # what runs the reductions on the CPU backend (conv.py)
    batch_norm_axis: str | None = None  # a mapped axis over which BatchNorm takes its statistics

    @classmethod
    def from_config(cls, model: Any, in_channels: int, num_classes: int) -> UNetConfig:
        """The architecture a run's `config.model` sets, for data of these channel counts."""
        return cls(
            in_channels=in_channels,
            num_classes=num_classes,
            depth=model.depth,
            base_width=model.base_width,
            max_width=model.max_width,
            norm=model.norm,
            compute_dtype=model.compute_dtype,
            weight_grad_parts=model.weight_grad_parts,
            cpu_conv_library=model.cpu_conv_library,
            cpu_reduce_library=model.cpu_reduce_library,
        )

    def compiler_options(self) -> dict[str, str] | None:
        """`jax.jit`'s `compiler_options` for a function that runs this U-Net: the CPU
        libraries of its convolutions and reductions (`conv.compiler_options`)."""
        return compiler_options(self.cpu_conv_library, self.cpu_reduce_library)

    def save(self, workdir: Path) -> None:
        """Record the architecture in `WORKDIR/model.json`, for inference from the run."""
        text = json.dumps(dataclasses.asdict(self), indent=1) + "\n"
        atomic.write_text(Path(workdir) / MODEL_FILE, text)

    @classmethod
    def load(cls, workdir: Path) -> UNetConfig | None:
        """The architecture `save` recorded in `WORKDIR/model.json`; None without one."""
        path = Path(workdir) / MODEL_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def widths(self) -> list[int]:
        return [min(self.base_width * 2**level, self.max_width) for level in range(self.depth + 1)]


def _make_norm(config: UNetConfig, features: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
    if config.norm == "instance":
        return nnx.InstanceNorm(features, dtype=dtype, rngs=rngs)
    if config.norm == "group":
        return nnx.GroupNorm(
            features,
            num_groups=None,
            group_size=min(config.group_size, features),
            dtype=dtype,
            rngs=rngs,
        )
    if config.norm == "batch":
        return nnx.BatchNorm(
            features, momentum=0.9, dtype=dtype, axis_name=config.batch_norm_axis, rngs=rngs
        )
    raise ValueError(f"model.norm must be one of {NORMS}, got {config.norm!r}")


class ConvBlock(nnx.Module):
    """Two 3x3 convolutions, each followed by normalisation and leaky ReLU."""

    def __init__(
        self, in_features: int, out_features: int, config: UNetConfig, dtype, rngs: nnx.Rngs
    ):
        conv = split_weight_grad_conv(config.weight_grad_parts)

        def conv3x3(features_in: int) -> nnx.Conv:
            return nnx.Conv(
                features_in,
                out_features,
                (3, 3),
                use_bias=False,
                dtype=dtype,
                rngs=rngs,
                conv_general_dilated=conv,
            )

        self.conv1 = conv3x3(in_features)
        self.norm1 = _make_norm(config, out_features, dtype, rngs)
        self.conv2 = conv3x3(out_features)
        self.norm2 = _make_norm(config, out_features, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        return nnx.leaky_relu(self.norm2(self.conv2(x)), 0.01)


def _reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`x` reshaped to `shape`, whose leading axis takes `x`'s leading (batch) axis: under
    explicit sharding a reshape names its output's sharding, and the batch's is kept."""
    sharding = jax.typeof(x).sharding
    if sharding.mesh.axis_names:
        sharding = sharding.update(spec=P(sharding.spec[0], *[None] * (len(shape) - 1)))
    else:
        sharding = None
    return lax.reshape(x, shape, out_sharding=sharding)


class Upsample(nnx.ConvTranspose):
    """A 2x2 transposed convolution of stride 2: `nnx.ConvTranspose`'s parameters and values,
    computed as one matrix product.

    Each input pixel feeds its own 2x2 block of the output, so the layer is a product of the
    (pixels, in) activations with the (in, 2*2*out) kernel. Its gradients are products too:
    XLA's CPU backend computes the strided transposed convolution's weight gradient some 50
    to 200 times slower than its forward pass, which made these four layers half of a train
    step at 128x128. The product is written with two dimensions, which XLA's CPU backend
    hands to YNNPACK's matrix product: written as one einsum over (batch, height, width), the
    four layers with their skip concatenations ran 1.5 times slower, forward and backward.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, (2, 2), strides=(2, 2), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = self.promote_dtype(
            (x, self.kernel[...], self.bias[...]), dtype=self.dtype
        )
        batch, height, width, features = x.shape
        out = kernel.shape[-1]
        # lax.conv_transpose correlates with the kernel flipped in space; column (a, b, o) of
        # the matrix gives feature o of the pixel at (a, b) in each input pixel's 2x2 block
        matrix = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(features, 4 * out)
        pixels = _reshape(x, (batch * height * width, features)) @ matrix
        blocks = _reshape(pixels, (batch, height, width, 2, 2, out)).transpose(0, 1, 3, 2, 4, 5)
        return _reshape(blocks, (batch, 2 * height, 2 * width, out)) + bias


class UNet(nnx.Module):
    """U-Net mapping images (B, H, W, C) to float32 logits (B, H, W, num_classes).

    H and W must be divisible by 2**depth. Parameters are float32; activations use
    `compute_dtype` (float32 or bfloat16).
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        if config.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"model.compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r}"
            )
        dtype = jnp.dtype(config.compute_dtype)
        widths = config.widths()
        self.config = config
        self.encoders = nnx.List()
        in_features = config.in_channels
        for width in widths:
            self.encoders.append(ConvBlock(in_features, width, config, dtype, rngs))
            in_features = width
        self.upsamplers = nnx.List()
        self.decoders = nnx.List()
        for width in reversed(widths[:-1]):
            self.upsamplers.append(Upsample(in_features, width, dtype=dtype, rngs=rngs))
            self.decoders.append(ConvBlock(2 * width, width, config, dtype, rngs))
            in_features = width
        self.head = nnx.Conv(in_features, config.num_classes, (1, 1), dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            x = encoder(x)
            skips.append(x)
        skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders, strict=True):
            x = upsample(x)
            x = decoder(jnp.concatenate([x, skips.pop()], axis=-1))
        return self.head(x.astype(jnp.float32))


def _split(model: UNet) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State]:
    train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    eval_model = nnx.view(model, use_running_average=True, raise_if_not_found=False)
    eval_graphdef = nnx.split(eval_model, nnx.Param, nnx.BatchStat)[0]
    return train_graphdef, eval_graphdef, params, batch_stats


def init_model(
    model_config: UNetConfig, seed: int
) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State]:
    """Train-mode and eval-mode graphdefs, parameters and batch statistics of a new U-Net."""
    return _split(UNet(model_config, rngs=nnx.Rngs(seed)))


def abstract_model(
    model_config: UNetConfig,
) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State]:
    """`init_model`'s graphdefs, with parameters and batch statistics as shapes only: nothing
    is initialised or compiled."""
    return _split(nnx.eval_shape(lambda: UNet(model_config, rngs=nnx.Rngs(0))))


def model_graphdefs(model_config: UNetConfig) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    """The train-mode and eval-mode graphdefs alone (`abstract_model`)."""
    return abstract_model(model_config)[:2]


def flip_logits(model: UNet, images: jax.Array, flip: bool = False) -> dict[str, jax.Array]:
    """Logits (B, H, W, K) of images (B, H, W, C) under "logits"; with `flip`, also those of
    the horizontally mirrored images, mirrored back, under "mirrored"."""
    logits = {"logits": model(images)}
    if flip:
        logits["mirrored"] = model(images[:, :, ::-1])[:, :, ::-1]
    return logits


def averaged_probabilities(logits: dict[str, jax.Array]) -> jax.Array:
    """The softmax (B, H, W, K) of `flip_logits`' output: averaged with the mirrored pass's
    when there is one."""
    probs = jax.nn.softmax(logits["logits"], axis=-1)
    if "mirrored" in logits:
        probs = 0.5 * (probs + jax.nn.softmax(logits["mirrored"], axis=-1))
    return probs


def class_probabilities(model: UNet, images: jax.Array, flip: bool = False) -> jax.Array:
    """Softmax (B, H, W, K) of images (B, H, W, C); with `flip`, averaged with that of the
    horizontally mirrored images (mirrored back)."""
    return averaged_probabilities(flip_logits(model, images, flip))


def conv_flops_per_image(config: UNetConfig, height: int, width: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward pass, counting convolutions only: the
    count `torch.utils.flop_counter` gives for the same network, so figures compare."""
    widths = config.widths()
    flops = 0.0
    in_features = config.in_channels
    for level, w in enumerate(widths):
        pixels = (height // 2**level) * (width // 2**level)
        flops += 2 * pixels * 9 * (in_features * w + w * w)
        in_features = w
    for level in reversed(range(config.depth)):
        w = widths[level]
        pixels = (height // 2**level) * (width // 2**level)
        flops += 2 * pixels * in_features * w  # transposed 2x2, stride 2: one tap per output
        flops += 2 * pixels * 9 * (2 * w * w + w * w)
        in_features = w
    flops += 2 * height * width * in_features * config.num_classes
    return flops
