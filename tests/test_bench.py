"""The bench's figures: the FLOP count it divides by."""

import pytest

from selfcleanse_jax.models.unet import UNetConfig, conv_flops_per_image


@pytest.mark.parametrize(("size", "gflops"), [(128, 6.020), (256, 24.079)])
def test_the_flop_count_is_the_one_torch_counts_for_the_same_u_net(size, gflops):
    # torch.utils.flop_counter on the PyTorch peer's plain U-Net (widths 32..512, 2x2
    # transposed convolutions, 1x1 head, 4 classes), as its README reports
    assert conv_flops_per_image(UNetConfig(), size, size) / 1e9 == pytest.approx(gflops, abs=5e-4)
