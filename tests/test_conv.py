"""The convolution whose weight gradient is summed over parts of the batch, and the U-Net's
matrix-product upsampling: the same values and gradients as the plain layers, to float
tolerance. `model.cpu_conv_library` and `model.cpu_reduce_library` decide which libraries run
the convolutions and the reductions on the CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from selfcleanse_jax.augment import AugmentConfig
from selfcleanse_jax.models import unet
from selfcleanse_jax.models.conv import (
    AUTO_PARTS,
    CPU_CONV_LIBRARIES,
    CPU_REDUCE_LIBRARIES,
    compiler_options,
    split_weight_grad_conv,
)
from selfcleanse_jax.models.unet import UNet, UNetConfig, Upsample
from selfcleanse_jax.steps import StepConfig, Steps


@pytest.mark.parametrize(
    "settings",
    [
        {"window_strides": (1, 1), "padding": "SAME"},
        {"window_strides": (2, 1), "padding": [(1, 1), (0, 2)], "rhs_dilation": (2, 2)},
        {"window_strides": (1, 1), "padding": "SAME", "feature_group_count": 2},
        {
            "window_strides": (1, 1),
            "padding": "VALID",
            "dimension_numbers": ("NCHW", "OIHW", "NCHW"),
        },
    ],
)
@pytest.mark.parametrize("parts", [4, 0])  # 4 does not divide the batch of 6: gcd, 2 parts
def test_values_and_gradients_equal_the_plain_convolution(settings, parts):
    keys = jax.random.split(jax.random.key(0), 3)
    nchw = settings.get("dimension_numbers", ("NHWC",))[0] == "NCHW"
    groups = settings.get("feature_group_count", 1)
    lhs = jax.random.normal(keys[0], (6, 4, 10, 10) if nchw else (6, 10, 10, 4))
    rhs = jax.random.normal(keys[1], (6, 4 // groups, 3, 3) if nchw else (3, 3, 4 // groups, 6))
    if not nchw:
        settings = {**settings, "dimension_numbers": ("NHWC", "HWIO", "NHWC")}
    plain = lambda x, w: lax.conv_general_dilated(x, w, **settings)  # noqa: E731
    split = lambda x, w: split_weight_grad_conv(parts)(x, w, **settings)  # noqa: E731
    np.testing.assert_array_equal(split(lhs, rhs), plain(lhs, rhs))
    cotangent = jax.random.normal(keys[2], plain(lhs, rhs).shape)
    for got, want in zip(
        jax.vjp(split, lhs, rhs)[1](cotangent), jax.vjp(plain, lhs, rhs)[1](cotangent), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("parts", [2, 0])
def test_the_unets_parameter_gradients_equal_the_plain_ones(parts):
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    labels = jax.random.randint(jax.random.key(2), (4, 8, 8), 0, 3)

    def gradients(parts):
        config = UNetConfig(num_classes=3, depth=1, base_width=4, weight_grad_parts=parts)
        graphdef, params = nnx.split(UNet(config, rngs=nnx.Rngs(0)))

        def loss(p):
            logits = nnx.merge(graphdef, p)(images)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

        return jax.jit(jax.grad(loss))(params)

    plain, split = gradients(1), gradients(parts)
    for got, want in zip(jax.tree.leaves(split), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_parts_below_zero_are_refused():
    with pytest.raises(ValueError, match="at least 0"):
        split_weight_grad_conv(-1)


@pytest.mark.parametrize("parts, weight_grads", [(0, AUTO_PARTS), (1, 1), (4, 4), (3, 1)])
def test_the_weight_gradient_is_summed_over_the_parts_asked_for(parts, weight_grads):
    # parts=0 takes AUTO_PARTS on the CPU backend (the tests' backend); 3 does not divide 8.
    # The lowered gradient keeps one convolution per part (the forward pass and the input
    # gradient are not needed for the weights' gradient of a sum).
    settings = {"window_strides": (1, 1), "padding": "SAME"}
    settings["dimension_numbers"] = ("NHWC", "HWIO", "NHWC")
    keys = jax.random.split(jax.random.key(3))
    lhs, rhs = jax.random.normal(keys[0], (8, 6, 6, 2)), jax.random.normal(keys[1], (3, 3, 2, 3))
    conv = split_weight_grad_conv(parts)
    gradient = jax.jit(jax.grad(lambda w: jnp.sum(conv(lhs, w, **settings))))
    assert gradient.lower(rhs).as_text().count("stablehlo.convolution") == weight_grads
    plain = jax.grad(lambda w: jnp.sum(lax.conv_general_dilated(lhs, w, **settings)))(rhs)
    np.testing.assert_allclose(gradient(rhs), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_upsampling_is_the_transposed_convolution(dtype):
    rngs = nnx.Rngs(0)
    upsample = Upsample(6, 5, dtype=dtype, rngs=rngs)
    transposed = nnx.ConvTranspose(6, 5, (2, 2), strides=(2, 2), dtype=dtype, rngs=rngs)
    bias = jax.random.normal(jax.random.key(6), (5,))
    upsample.bias[...] = transposed.bias[...] = bias
    transposed.kernel[...] = upsample.kernel[...]
    images = jax.random.normal(jax.random.key(7), (3, 4, 7, 6))
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == jnp.bfloat16 else {"atol": 1e-5}
    np.testing.assert_allclose(upsample(images), transposed(images), **tolerance)

    def gradients(layer):
        graphdef, params = nnx.split(layer)
        return jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2), (0, 1))(
            params, images
        )

    for got, want in zip(
        jax.tree.leaves(gradients(upsample)), jax.tree.leaves(gradients(transposed)), strict=True
    ):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got / scale, want / scale, **tolerance)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_the_upsampling_runs_on_a_batch_split_over_a_mesh(axis_type):
    # inference's mesh comes from jax.make_mesh, whose axes are explicit by default
    mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    upsample = Upsample(6, 5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(upsample)
    images = jax.random.normal(jax.random.key(8), (8, 4, 4, 6))
    run = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    split = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    out = run(jax.device_put(params, NamedSharding(mesh, PartitionSpec())), split)
    assert len(out.sharding.device_set) == 4
    np.testing.assert_allclose(out, upsample(images), rtol=1e-6, atol=1e-6)


def _in_ynn_fusions(compiled_hlo: str, op: str, detail: str = "") -> int:
    """Instructions `op(` (whose line holds `detail`) that XLA's compiled module hands to
    YNNPACK: those inside a YNN fusion."""
    bodies = dict(re.findall(r"^%(\S+) \(.*?\{\n(.*?)\n\}", compiled_hlo, re.M | re.S))
    called = re.findall(r"calls=%(\S+?),[^\n]*__ynn_fusion", compiled_hlo)
    lines = [line for name in called for line in bodies.get(name, "").splitlines()]
    return sum(f" {op}(" in line and detail in line for line in lines)


def _one_step_inputs(**libraries):
    """Steps of a U-Net with the shapes YNNPACK takes at 64x64 (32 channels), a batch of 8
    and a key; `libraries` are the U-Net's CPU library keys. No augmentation: its resampled
    labels flip where the libraries' rounding differs, which would hide the layers' own
    agreement."""
    model = UNetConfig(num_classes=3, depth=1, base_width=32, **libraries)
    config = StepConfig(num_classes=3, augment=AugmentConfig(enabled=False))
    steps = Steps(model, optax.sgd(0.1), config, parallel="none")
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 64, 64, 1)).astype(np.float32),
        "target": rng.integers(0, 3, (8, 64, 64)).astype(np.uint8),
        "weight": np.ones(8, np.float32),
        "idx": np.arange(8, dtype=np.int32),
    }
    return steps, batch, jax.random.key(0)


def _train_step_hlo(**libraries) -> str:
    steps, batch, key = _one_step_inputs(**libraries)
    lowered = steps._train.lower(steps.init_state(0), steps.put_batch(batch), steps.put_key(key))
    return lowered.compile().as_text()


@pytest.mark.parametrize("library", CPU_CONV_LIBRARIES)
def test_the_cpu_conv_library_runs_the_convolutions_of_a_conv_and_of_the_train_step(library):
    # XLA hands a convolution to YNNPACK only where its cost model finds it worth it: these
    # shapes are the U-Net's at 64x64 with 32 channels, which it takes.
    options = compiler_options(library, "xla")
    if options is None:
        pytest.skip("this XLA's CPU backend has no YNNPACK fusions")
    settings = {"window_strides": (1, 1), "padding": "SAME"}
    settings["dimension_numbers"] = ("NHWC", "HWIO", "NHWC")
    conv = jax.jit(
        lambda x, w: lax.conv_general_dilated(x, w, **settings), compiler_options=options
    )
    hlo = conv.lower(jnp.zeros((8, 64, 64, 32)), jnp.zeros((3, 3, 32, 32))).compile().as_text()
    assert _in_ynn_fusions(hlo, "convolution") == (1 if library == "ynnpack" else 0)
    # the head's 1x1 convolution may join a YNNPACK reduction (the softmax's maximum)
    step_hlo = _train_step_hlo(cpu_conv_library=library)
    step_convolutions = _in_ynn_fusions(step_hlo, "convolution", "size=3x3")
    assert step_convolutions > 0 if library == "ynnpack" else step_convolutions == 0


@pytest.mark.parametrize("library", CPU_REDUCE_LIBRARIES)
def test_the_cpu_reduce_library_runs_the_reductions_of_a_norm_and_of_the_train_step(library):
    options = compiler_options("eigen", library)
    takes = options is not None and "REDUCE" in options["xla_cpu_experimental_ynn_fusion_type"]
    if library == "ynnpack" and not takes:
        pytest.skip("this XLA's CPU backend has no YNNPACK reductions")
    statistics = jax.jit(lambda x: jnp.mean(x, axis=(1, 2)), compiler_options=options)
    hlo = statistics.lower(jnp.zeros((8, 64, 64, 32))).compile().as_text()
    reductions = _in_ynn_fusions(hlo, "reduce")
    assert reductions > 0 if library == "ynnpack" else reductions == 0
    step_reductions = _in_ynn_fusions(_train_step_hlo(cpu_reduce_library=library), "reduce")
    assert step_reductions > 0 if library == "ynnpack" else step_reductions == 0


def test_an_unknown_cpu_library_is_refused():
    with pytest.raises(ValueError, match="model.cpu_conv_library must be one of"):
        compiler_options("onednn", "ynnpack")
    with pytest.raises(ValueError, match="model.cpu_reduce_library must be one of"):
        compiler_options("eigen", "eigen")


def test_both_cpu_conv_libraries_take_the_same_train_step():
    # the same losses, and the same update to float rounding: each leaf's update within
    # 1e-4 of its largest entry
    losses, updates = [], []
    for library in CPU_CONV_LIBRARIES:
        steps, batch, key = _one_step_inputs(cpu_conv_library=library)
        start = steps.init_state(0)
        before = jax.tree.leaves(steps.get_state(start).params)
        state, step_losses, finite = steps.train(start, batch, key)
        assert bool(finite)
        losses.append(np.asarray(step_losses))
        after = jax.tree.leaves(steps.get_state(state).params)
        updates.append([np.asarray(a) - np.asarray(b) for a, b in zip(after, before, strict=True)])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for got, want in zip(*updates, strict=True):
        scale = np.max(np.abs(want))
        assert scale > 0
        np.testing.assert_allclose(got / scale, want / scale, atol=1e-4)


def test_the_gradients_with_ynnpack_reductions_are_float64s_to_float32_rounding(monkeypatch):
    # The instance norms' statistics and their gradients are sums over every pixel; with
    # XLA's own reductions some leaves of this U-Net's gradient were 3% off float64's.
    if "REDUCE" not in (compiler_options("eigen", "ynnpack") or {}).get(
        "xla_cpu_experimental_ynn_fusion_type", ""
    ):
        pytest.skip("this XLA's CPU backend has no YNNPACK reductions")
    monkeypatch.setattr(unet, "COMPUTE_DTYPES", (*unet.COMPUTE_DTYPES, "float64"))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 64, 64, 1))
    targets = np.eye(3)[rng.integers(0, 3, (8, 64, 64))]

    def gradients(dtype: str) -> list[np.ndarray]:
        config = UNetConfig(num_classes=3, depth=1, base_width=32, compute_dtype=dtype)
        graphdef, params = nnx.split(UNet(config, rngs=nnx.Rngs(0)))
        params = jax.tree.map(lambda leaf: leaf.astype(dtype), params)

        def loss(params):
            logits = nnx.merge(graphdef, params)(jnp.asarray(images, dtype)).astype(dtype)
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * targets, -1))

        options = compiler_options("eigen", "ynnpack") if dtype == "float32" else None
        grads = jax.jit(jax.grad(loss), compiler_options=options)(params)
        return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(grads)]

    with jax.enable_x64(True):
        reference, got = gradients("float64"), gradients("float32")
    for leaf, want in zip(got, reference, strict=True):
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(leaf / scale, want / scale, atol=1e-4)
