"""The convolution whose weight gradient is summed over parts of the batch, and the U-Net's
matrix-product upsampling: the same values and gradients as the plain layers, to float
tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from selfcleanse_jax.models.conv import AUTO_PARTS, split_weight_grad_conv
from selfcleanse_jax.models.unet import UNet, UNetConfig, Upsample


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
