"""Dataset layouts on disk (MSD / nnU-Net raw, ACDC, LiTS): detect one, read it, list its files.

Every reader returns raw `Case` objects in file orientation (no reorientation or
normalisation) plus a `DatasetInfo` with the class names and the modality.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator
from pathlib import Path

from selfcleanse_jax.data import acdc, lits, msd
from selfcleanse_jax.data.cases import Case

LAYOUTS = ("msd", "acdc", "lits")
SPLITS = ("train", "test")


@dataclasses.dataclass
class DatasetInfo:
    """What a dataset says about itself: class names by label value, "mri" or "ct", layout."""

    class_names: list[str]
    modality: str
    layout: str


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def detect_layout(root: Path) -> str:
    """The layout of the dataset at `root`: "msd" (dataset.json), "acdc" (patientNNN/ folders,
    directly or under training/ or testing/) or "lits" (volume-N files anywhere below)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: folder not found, no dataset found")
    if not any(root.iterdir()):
        raise ValueError(f"{root}: empty folder, no dataset found")
    if (root / "dataset.json").is_file():
        return "msd"
    if any(acdc.split_patients(root, split) for split in SPLITS):
        return "acdc"
    if lits.lits_files(root):
        return "lits"
    raise ValueError(
        f"{root}: no dataset found (looked for dataset.json, patientNNN/ folders directly or "
        "under training/ or testing/, and volume-N.nii[.gz] files below)"
    )


def layout_files(root: Path, layout: str = "") -> list[Path]:
    """Every file the dataset at `root` is read from, without loading any volume.

    Meant for cache keys; `layout` "" detects it.
    """
    root = Path(root)
    layout = layout or detect_layout(root)
    _check_layout(layout)
    if layout == "msd":
        return msd.msd_files(root)
    if layout == "acdc":
        return acdc.acdc_files(root)
    return sorted(p for by_number in lits.lits_files(root).values() for p in by_number.values())


def dataset_info(
    root: Path, layout: str = "", *, lits_classes: str = "liver_tumour"
) -> DatasetInfo:
    """Class names and modality of the dataset at `root`, without loading any volume."""
    root = Path(root)
    layout = layout or detect_layout(root)
    _check_layout(layout)
    if layout == "msd":
        description = msd.read_dataset_json(root)
        return DatasetInfo(*msd.msd_info(description, root / "dataset.json"), "msd")
    if layout == "acdc":
        return DatasetInfo(list(acdc.CLASS_NAMES), acdc.MODALITY, "acdc")
    if lits_classes not in lits.CLASS_CHOICES:
        raise ValueError(
            f"lits_classes must be one of {sorted(lits.CLASS_CHOICES)}, got {lits_classes!r}"
        )
    return DatasetInfo(list(lits.CLASS_CHOICES[lits_classes]), lits.MODALITY, "lits")


def iter_layout(
    root: Path,
    layout: str = "",
    split: str = "train",
    *,
    lits_classes: str = "liver_tumour",
    names: Collection[str] | None = None,
) -> Iterator[Case]:
    """The cases of one split, read one at a time (so a large dataset need not fit in memory);
    `layout` "" detects it; with `names`, only those cases (the others are not read).

    "train" gives the labelled training cases; "test" the test cases (labels when present,
    else None; nothing when the dataset has none). `lits_classes` picks the LiTS class set
    ("liver_tumour" or "tumour").
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    layout = layout or detect_layout(root)
    _check_layout(layout)
    if layout == "msd":
        description = msd.read_dataset_json(root)
        has_split = split == "train" or description.get("test") or (root / "imagesTs").is_dir()
        return msd.iter_msd(root, split, names) if has_split else iter(())
    if layout == "acdc":
        return acdc.iter_acdc(root, split, names)
    return lits.iter_lits(root, split, lits_classes, names)


def read_layout(
    root: Path, layout: str = "", split: str = "train", *, lits_classes: str = "liver_tumour"
) -> tuple[list[Case], DatasetInfo]:
    """All cases of one split (see `iter_layout`) and the dataset's info."""
    layout = layout or detect_layout(Path(root))
    info = dataset_info(root, layout, lits_classes=lits_classes)
    return list(iter_layout(root, layout, split, lits_classes=lits_classes)), info
