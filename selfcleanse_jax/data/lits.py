"""LiTS (Liver Tumor Segmentation) layout: read, and a small writer for tests.

Layout (folders below `root` are searched recursively, e.g. ``Training Batch 1/``)::

    volume-N.nii       segmentation-N.nii      (training: 0 background, 1 liver, 2 tumour)
    test-volume-N.nii                          (test: no labels)

``.nii.gz`` files are accepted too. Cases are named ``volume-N`` / ``test-volume-N`` and
sorted by N numerically.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import numpy as np

from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.msd import affine_with_spacing, load_case, save_nifti

CLASS_CHOICES = {
    "liver_tumour": ["background", "liver", "tumour"],
    "tumour": ["background", "tumour"],
}
"""Class sets: labels as given, or tumour only (tumour -> 1, liver -> 0)."""

MODALITY = "ct"
_FILE = re.compile(r"(volume|segmentation|test-volume|test-segmentation)-(\d+)\.nii(\.gz)?")


def lits_files(root: Path) -> dict[str, dict[int, Path]]:
    """LiTS files below `root` by kind ("volume", "segmentation", "test-volume", ...) and N.

    Two files of one kind and number (say ``volume-3.nii`` in two batches) are an error.
    """
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(Path(root).rglob("*.nii*")):
        match = _FILE.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        kind, number = match.group(1), int(match.group(2))
        other = found.setdefault(kind, {}).get(number)
        if other is not None:
            raise ValueError(f"{path}: duplicate of {other}")
        found[kind][number] = path
    return found


def _pairs(root: Path, split: str) -> list[tuple[str, Path, Path | None]]:
    """(case name, volume, segmentation or None) of `split`, sorted by number."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = lits_files(root)
    prefix = "" if split == "train" else "test-"
    volumes = files.get(f"{prefix}volume", {})
    segmentations = files.get(f"{prefix}segmentation", {})
    for number, path in sorted(segmentations.items()):
        if number not in volumes:
            raise ValueError(f"{path}: no matching {prefix}volume-{number} file")
    out = []
    for number, volume in sorted(volumes.items()):
        segmentation = segmentations.get(number)
        if segmentation is None and split == "train":
            raise ValueError(f"{volume}: no matching segmentation-{number} file")
        out.append((f"{prefix}volume-{number}", volume, segmentation))
    return out


def iter_lits(
    root: Path,
    split: str = "train",
    classes: str = "liver_tumour",
    names: Collection[str] | None = None,
) -> Iterator[Case]:
    """Cases of one split ("train" or "test"), labelled per `classes` (see `CLASS_CHOICES`),
    read one at a time (only those in `names`, when given)."""
    if classes not in CLASS_CHOICES:
        raise ValueError(f"classes must be one of {sorted(CLASS_CHOICES)}, got {classes!r}")
    pairs = [p for p in _pairs(root, split) if names is None or p[0] in names]
    return (_load_pair(*pair, classes) for pair in pairs)


def _load_pair(name: str, volume: Path, segmentation: Path | None, classes: str) -> Case:
    case = load_case(name, volume, segmentation, len(CLASS_CHOICES["liver_tumour"]))
    if case.label is not None and classes == "tumour":
        case.label = (case.label == 2).astype(np.uint8)
    return case


def read_lits(root: Path, split: str = "train", classes: str = "liver_tumour") -> list[Case]:
    """All cases of one split (see `iter_lits`)."""
    return list(iter_lits(root, split, classes))


def write_lits(
    root: Path,
    volumes: Mapping[int, Case],
    *,
    folder: str = "",
    test: bool = False,
    ending: str = ".nii",
) -> Path:
    """Write ``{N: case}`` as ``volume-N`` / ``segmentation-N`` files and return `root`.

    Files go to ``root/folder/``; `test` writes ``test-volume-N`` instead (a label, when
    given, as ``test-segmentation-N``). A label of None writes no segmentation file.
    """
    directory = Path(root) / folder
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "test-" if test else ""
    for number, case in volumes.items():
        affine = affine_with_spacing(case.affine, case.spacing)
        image = np.asarray(case.image, np.float32)
        save_nifti(image, affine, directory / f"{prefix}volume-{number}{ending}")
        if case.label is not None:
            label = np.asarray(case.label, np.uint8)
            save_nifti(label, affine, directory / f"{prefix}segmentation-{number}{ending}")
    return Path(root)
