"""How the U-Net's convolutions and reductions run on the CPU backend: which library XLA
hands them to, and a convolution whose weight gradient is summed over parts of the batch.

XLA's CPU backend gives convolutions to YNNPACK by default; its own (Eigen) kernels run the
U-Net's 3x3 convolutions faster on this project's CPU in all three directions: the forward
pass and the input gradient 1.1 to 2.6 times, the weight gradient 2.5 to 4.6 times. The
`compiler_options` of a jitted function pick the library.

XLA emits its own loops for reductions (the normalisations' statistics, the losses' sums)
unless told to hand them to YNNPACK, whose kernels ran this project's train step at
128x128 1.13 times faster on its CPU, and sum more accurately: with XLA's loops some leaves
of a small U-Net's gradient were 3% off float64's, with YNNPACK's within 3e-6 (tested).
The U-Net's 1x1 head joins YNNPACK's reduction of the softmax's maximum.

With YNNPACK's kernels the weight gradient runs several times slower than the forward pass,
and the same gradient as a sum of independent per-part gradients runs about twice as fast
(the parts run side by side on the CPU's cores); with Eigen's the whole gradient is the
faster. The forward pass and the input gradient are the plain ones, and the sum is the same
gradient up to float rounding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

CPU_CONV_LIBRARIES = ("eigen", "ynnpack")
"""`model.cpu_conv_library`: which library runs the convolutions on the CPU backend."""

CPU_REDUCE_LIBRARIES = ("ynnpack", "xla")
"""`model.cpu_reduce_library`: which library runs the reductions on the CPU backend."""

_YNN_FUSION_TYPES = {
    "eigen": ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",),
    "ynnpack": ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),
}
"""XLA's `xla_cpu_experimental_ynn_fusion_type` for each convolution library: its default
hands both matrix products and convolutions to YNNPACK; matrix products stay there either
way."""

_YNN_REDUCE_FUSION_TYPES = {"ynnpack": ("LIBRARY_FUSION_TYPE_REDUCE",), "xla": ()}
"""What each reduction library adds to the fusion types (XLA's default emits its own)."""


def compiler_options(cpu_conv_library: str, cpu_reduce_library: str) -> dict[str, str] | None:
    """`jax.jit`'s `compiler_options` that run convolutions with `cpu_conv_library` (one of
    `CPU_CONV_LIBRARIES`) and reductions with `cpu_reduce_library` (`CPU_REDUCE_LIBRARIES`)
    on the CPU backend; None off the CPU, or where this XLA has no YNNPACK fusions (its
    convolutions are then Eigen's, its reductions its own). A fusion type this XLA does not
    know is left out."""
    if cpu_conv_library not in CPU_CONV_LIBRARIES:
        raise ValueError(
            f"model.cpu_conv_library must be one of {CPU_CONV_LIBRARIES}, got {cpu_conv_library!r}"
        )
    if cpu_reduce_library not in CPU_REDUCE_LIBRARIES:
        raise ValueError(
            f"model.cpu_reduce_library must be one of {CPU_REDUCE_LIBRARIES}, "
            f"got {cpu_reduce_library!r}"
        )
    if jax.default_backend() != "cpu":
        return None
    types = _YNN_FUSION_TYPES[cpu_conv_library] + _YNN_REDUCE_FUSION_TYPES[cpu_reduce_library]
    known = [fusion_type for fusion_type in types if _xla_knows(fusion_type)]
    return {"xla_cpu_experimental_ynn_fusion_type": ",".join(known)} if known else None


@functools.cache
def _xla_knows(fusion_type: str) -> bool:
    """Whether this XLA's CPU backend takes `fusion_type` as a YNNPACK fusion type."""
    options = {"xla_cpu_experimental_ynn_fusion_type": fusion_type}
    try:
        jax.jit(jnp.negative, compiler_options=options).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


AUTO_PARTS = 8
"""Parts of the batch (at most; a divisor of its size) that `parts=0` takes on the CPU
backend; on other backends it takes 1, XLA's own weight gradient."""


def resolve_parts(parts: int) -> int:
    """`model.weight_grad_parts` as the convolution takes it: 0 is `AUTO_PARTS` when JAX's
    default backend is the CPU and 1 (plain) elsewhere."""
    if parts < 0:
        raise ValueError(f"parts must be at least 0, got {parts}")
    if parts == 0:
        return AUTO_PARTS if jax.default_backend() == "cpu" else 1
    return parts


def split_weight_grad_conv(parts: int):
    """A drop-in for `lax.conv_general_dilated` (as `nnx.Conv(conv_general_dilated=...)`
    takes it) whose weight gradient is summed over `parts` slices of the batch (see
    `resolve_parts`); 1 is plain."""
    parts = resolve_parts(parts)

    def conv(lhs, rhs, window_strides, padding, **settings):
        if parts == 1 or settings.get("batch_group_count", 1) != 1:
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **settings)
        if not isinstance(padding, str):
            padding = tuple(tuple(p) for p in padding)
        static = (tuple(window_strides), padding, *sorted(_hashable(settings).items()))
        return _conv(lhs, rhs, static, parts)

    return conv


def _hashable(settings: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


def _plain(lhs, rhs, static):
    window_strides, padding, *settings = static
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **dict(settings))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(lhs, rhs, static, parts):
    return _plain(lhs, rhs, static)


def _conv_fwd(lhs, rhs, static, parts):
    return _plain(lhs, rhs, static), (lhs, rhs)


def _conv_bwd(static, parts, residuals, cotangent):
    lhs, rhs = residuals
    settings = dict(static[2:])
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, settings.get("dimension_numbers"))
    batch_axis = numbers.lhs_spec[0]
    lhs_grad = jax.vjp(lambda x: _plain(x, rhs, static), lhs)[1](cotangent)[0]
    pieces = math.gcd(parts, lhs.shape[batch_axis])
    rhs_grad = sum(
        jax.vjp(lambda w, x=x: _plain(x, w, static), rhs)[1](g)[0]
        for x, g in zip(
            jnp.split(lhs, pieces, axis=batch_axis),
            jnp.split(cotangent, pieces, axis=numbers.out_spec[0]),
            strict=True,
        )
    )
    return lhs_grad, rhs_grad


_conv.defvjp(_conv_fwd, _conv_bwd)
