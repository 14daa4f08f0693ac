"""Shared assertion for tests that write cases to disk and read them back."""

import numpy as np

from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.msd import affine_with_spacing


def assert_same_case(read: Case, original: Case) -> None:
    """`read` has `original`'s arrays, dtypes, spacing and (spacing-scaled) affine."""
    np.testing.assert_array_equal(read.image, original.image)
    assert read.image.dtype == np.float32
    if original.label is None:
        assert read.label is None
    else:
        np.testing.assert_array_equal(read.label, original.label)
        assert read.label.dtype == np.uint8
    np.testing.assert_allclose(read.spacing, original.spacing, rtol=1e-6)
    expected = affine_with_spacing(original.affine, original.spacing)
    np.testing.assert_allclose(read.affine, expected, atol=1e-5)
