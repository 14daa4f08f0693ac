"""TensorBoard event files of a run (`train.tensorboard=True`), written with tensorboardX
(no TensorFlow): `tensorboard --logdir WORKDIR/tensorboard` shows a run while it trains.

Per epoch: every number of the epoch's record in metrics.jsonl as a scalar (its nested keys
joined by "/": `test_dice_per_class/right_ventricle`, `cleanse/detection/auc`, ...) and the
per-slice training loss as histograms, of the truly clean and the truly noisy slices apart.
Per cleansing round: the GMM's input, clean and noisy apart, and overlays of a few truly
noisy slices: the image with the clean label, the given label, the training target after
the round (the pseudo-label of a flagged slice) and the network's prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIRECTORY = "tensorboard"
"""The event files' folder inside the run folder."""

OVERLAY_SLICES = 4
"""The truly noisy slices (the first ones by index) drawn at every cleansing round."""

# Colour of each label value in the overlays: background (not drawn), red, green, blue and
# more for the classes, white past them (the ignore index).
_CLASS_COLOURS = [
    [0, 0, 0],
    [230, 60, 60],
    [60, 200, 60],
    [70, 110, 240],
    [240, 200, 40],
    [200, 80, 220],
]
_PALETTE = np.full((256, 3), 255.0, np.float32)
_PALETTE[: len(_CLASS_COLOURS)] = _CLASS_COLOURS


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record by tag: nested keys joined by "/" (spaces in them
    written as "_", as TensorBoard shows them), list items by their position; booleans,
    strings and None left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}{key}".replace(" ", "_")
        if isinstance(value, dict):
            out.update(scalars(value, tag + "/"))
        elif isinstance(value, list):
            out.update(scalars(dict(enumerate(value)), tag + "/"))
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def class_colour(label: int) -> tuple[float, float, float]:
    """The RGB colour (0..1) `overlay` draws class `label` in (white: the ignore index)."""
    return tuple(float(v) / 255.0 for v in _PALETTE[label])


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An (H, W, 3) uint8 picture: the image in grey (min-max scaled), each foreground class
    of `label` blended in its colour; labels past the palette (the ignore index) in white."""
    low, high = float(image.min()), float(image.max())
    grey = (image - low) / (high - low) if high > low else np.zeros_like(image)
    picture = np.repeat(255.0 * grey[..., None], 3, axis=-1)
    colour = _PALETTE[label.astype(np.uint8)]
    drawn = (label > 0)[..., None]
    picture = np.where(drawn, (1 - alpha) * picture + alpha * colour, picture)
    return np.clip(picture, 0, 255).astype(np.uint8)


class Board:
    """The run's TensorBoard writer; written by process 0 only (the caller decides)."""

    def __init__(self, workdir: Path, first_epoch: int, is_noisy: np.ndarray):
        from tensorboardX import SummaryWriter

        # A resumed run writes its epochs again: TensorBoard drops what the earlier
        # attempt wrote from `first_epoch` on.
        self.writer = SummaryWriter(
            str(Path(workdir) / DIRECTORY), purge_step=first_epoch or None, flush_secs=30
        )
        self.is_noisy = np.asarray(is_noisy, bool)
        self.shown = np.flatnonzero(self.is_noisy)[:OVERLAY_SLICES]

    def _histograms(self, tag: str, values: np.ndarray, epoch: int) -> None:
        """`values` of the truly clean and the truly noisy slices apart (NaN left out)."""
        for name, members in (("clean", ~self.is_noisy), ("noisy", self.is_noisy)):
            chosen = values[members]
            chosen = chosen[np.isfinite(chosen)]
            if chosen.size:
                self.writer.add_histogram(f"{tag}/{name}", chosen, epoch)

    def epoch(self, record: dict, train_loss: np.ndarray) -> None:
        """The epoch's record as scalars; its per-slice training losses as histograms."""
        epoch = int(record["epoch"])
        for tag, value in scalars(record).items():
            if tag != "epoch":
                self.writer.add_scalar(tag, value, epoch)
        self._histograms("train_loss", np.asarray(train_loss, np.float32), epoch)
        self.writer.flush()

    def cleansing_round(
        self,
        epoch: int,
        lfm_input: np.ndarray,
        images: np.ndarray,
        labels: dict[str, np.ndarray],
    ) -> None:
        """The GMM's input as histograms, and the overlays of the shown slices on the first
        channel of `images` (N, H, W, C): one row per slice, one column per entry of `labels`
        (name -> (N, H, W) labels of every slice)."""
        self._histograms("lfm_input", np.asarray(lfm_input, np.float32), epoch)
        if not len(self.shown):
            return
        rows = [
            np.concatenate([overlay(images[i, ..., 0], labels[name][i]) for name in labels], axis=1)
            for i in self.shown
        ]
        grid = np.concatenate(rows, axis=0)
        tag = "overlays/" + "_".join(labels)
        self.writer.add_image(tag, grid, epoch, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
