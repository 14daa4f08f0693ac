"""The bench: the FLOP count it divides by, its device report, and its train-step parts."""

from types import SimpleNamespace

import pytest

from selfcleanse_jax import bench
from selfcleanse_jax.models.unet import UNetConfig, conv_flops_per_image


@pytest.mark.parametrize(
    ("kind", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
    ],
)
def test_a_known_accelerator_takes_its_data_sheet_peak(kind, peak):
    found, source = bench.bfloat16_peak(SimpleNamespace(device_kind=kind))
    assert found == peak
    assert source.startswith("data sheet")


def test_the_device_report_times_its_batch_sizes_against_a_measured_peak_on_the_cpu():
    report = bench.device_report(batch_sizes=(8,), image_size=32, repeats=1, depth=2, base_width=8)
    assert report["device"].startswith("cpu")
    assert report["bfloat16_peak_source"].startswith("measured")
    assert set(report["bfloat16_train"]) == {"8"}
    flops = report["train_flops_per_image"]
    for figures in report["bfloat16_train"].values():
        assert figures["train_images_per_s"] > 0
        assert figures["fraction_of_bfloat16_peak"] == pytest.approx(
            figures["train_images_per_s"] * flops / report["bfloat16_peak_flops_per_s"]
        )


@pytest.mark.parametrize(("size", "gflops"), [(128, 6.020), (256, 24.079)])
def test_the_flop_count_is_the_one_torch_counts_for_the_same_u_net(size, gflops):
    # torch.utils.flop_counter on the PyTorch peer's plain U-Net (widths 32..512, 2x2
    # transposed convolutions, 1x1 head, 4 classes), as its README reports
    assert conv_flops_per_image(UNetConfig(), size, size) / 1e9 == pytest.approx(gflops, abs=5e-4)


@pytest.mark.slow  # 22 s; `selfcleanse bench` runs the same function
def test_every_part_of_the_train_step_is_timed_on_its_own():
    trainer = bench._trainer(32, 1, depth=2, base_width=8)
    parts = bench.train_step_parts(trainer, bench._train_batch(trainer, 4), repeats=1)
    assert set(parts) == {
        "augment",
        "forward",
        "forward_and_input_grad",
        "forward_and_param_grad",
        "optimizer",
        "step",
    }
    assert all(0 < seconds < 60 for seconds in parts.values())
