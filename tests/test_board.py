"""TensorBoard event files of a run, read back with TensorBoard's own reader."""

import json

import numpy as np
import pytest

from selfcleanse_jax import board, train
from tiny import tiny_config

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard not installed (pip install -e '.[test]')",
)


def _read(workdir):
    reader = event_accumulator.EventAccumulator(
        str(workdir / board.DIRECTORY), size_guidance={"images": 0, "histograms": 0}
    )
    return reader.Reload()


def test_scalars_flatten_the_record_and_leave_out_what_is_not_a_number():
    record = {
        "epoch": 3,
        "train_loss": 0.5,
        "cleanse": {"flagged": 2, "gmm_means": [0.1, 0.9], "gmm_degenerate": False},
        "pseudo_label_dice": None,
        "lfm_view": {"status": "ok"},
        "test_dice_per_class": {"left ventricle": np.float32(0.75)},
    }
    assert board.scalars(record) == {
        "epoch": 3.0,
        "train_loss": 0.5,
        "cleanse/flagged": 2.0,
        "cleanse/gmm_means/0": 0.1,
        "cleanse/gmm_means/1": 0.9,
        "test_dice_per_class/left_ventricle": 0.75,
    }


def test_overlay_blends_each_class_in_its_colour_on_the_grey_image():
    image = np.tile(np.linspace(0.0, 2.0, 4, dtype=np.float32), (4, 1))
    label = np.zeros((4, 4), np.uint8)
    label[0, 1], label[1, 2], label[2, 3] = 1, 2, 255  # a class, another, the ignore index
    picture = board.overlay(image, label, alpha=0.5)
    assert picture.shape == (4, 4, 3) and picture.dtype == np.uint8
    np.testing.assert_allclose(picture[3], np.repeat([[0], [85], [170], [255]], 3, axis=1), atol=1)
    np.testing.assert_allclose(picture[0, 1], [157, 72, 72], atol=1)  # grey 85, red
    np.testing.assert_allclose(picture[1, 2], [115, 185, 115], atol=1)  # grey 170, green
    np.testing.assert_array_equal(picture[2, 3], [255, 255, 255])  # white


def test_a_run_writes_event_files_that_tensorboard_reads_back(tmp_path):
    config = tiny_config(
        **{
            "method": "selfcleanse",
            "train.epochs": 3,
            "cleanse.warmup_epochs": 1,
            "train.eval_every": 1,
            "train.checkpoint": False,
            "train.tensorboard": True,
        }
    )
    trainer = train.Trainer(config, tmp_path)
    trainer.run()
    events = _read(tmp_path)
    tags = events.Tags()
    assert {"train_loss", "test_dice", "test_dice_per_class/right_ventricle"} <= set(
        tags["scalars"]
    )
    assert {"cleanse/flagged", "cleanse/detection/auc"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("cleanse/flagged")] == [1, 2]
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 3
    written = [e.value for e in events.Scalars("test_dice")]
    expected = [json.loads(line)["test_dice"] for line in records]
    np.testing.assert_allclose(written, expected, rtol=1e-6)
    assert {"train_loss/clean", "train_loss/noisy", "lfm_input/clean", "lfm_input/noisy"} <= set(
        tags["histograms"]
    )
    noisy = int(trainer.noise.is_noisy.sum())
    histogram = events.Histograms("lfm_input/noisy")[0].histogram_value
    assert histogram.num == noisy
    (tag,) = tags["images"]
    assert tag == "overlays/clean_given_target_prediction"
    images = events.Images(tag)
    assert [image.step for image in images] == [1, 2]
    size = config.data.image_size
    shown = min(board.OVERLAY_SLICES, noisy)
    assert (images[0].height, images[0].width) == (shown * size, 4 * size)
