"""Cases (volumes) and the 2D slice table that training reads."""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_INDEX = 255
"""Label value that the loss ignores (pseudo-label pixels below the confidence threshold)."""


@dataclasses.dataclass
class Case:
    """One volume: image (H, W, Z) float32, label (H, W, Z) uint8 or None, voxel geometry."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))

    @classmethod
    def from_slices(
        cls, name: str, slices: list[tuple[np.ndarray, np.ndarray]], spacing: tuple
    ) -> Case:
        """A volume from (image, label) slices (H, W) in z order, with a diagonal affine of
        `spacing` (the phantoms' cases)."""
        return cls(
            name=name,
            image=np.stack([s[0] for s in slices], axis=-1),
            label=np.stack([s[1] for s in slices], axis=-1),
            spacing=spacing,
            affine=np.diag([*spacing, 1.0]),
        )


@dataclasses.dataclass
class SliceTable:
    """2D training samples cut from cases along the last axis.

    `idx` is each sample's stable id: its row in the table of all the cases it was cut from
    (cases in order, then z), kept when `select_cases` takes some of them, so a held-out
    share, a fold or another test fraction renumbers no slice. The noise, augmentation and
    per-slice records of a slice depend on its id, never on its row in a split.
    """

    images: np.ndarray  # (N, H, W, C) float32
    labels: np.ndarray  # (N, H, W) uint8
    case_index: np.ndarray  # (N,) int32, index into `case_names`
    z: np.ndarray  # (N,) int32, slice position in its case
    case_names: list[str]
    spacing: np.ndarray  # (N, 3) float32, voxel spacing of the (resized) slice in mm
    idx: np.ndarray | None = None  # (N,) int32 stable ids; None: the rows, 0..N-1

    def __post_init__(self):
        if self.idx is None:
            self.idx = np.arange(len(self), dtype=np.int32)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def volume_slices(self, case: int) -> np.ndarray:
        """Indices of one case's slices, ordered by z."""
        members = np.flatnonzero(self.case_index == case)
        return members[np.argsort(self.z[members], kind="stable")]
