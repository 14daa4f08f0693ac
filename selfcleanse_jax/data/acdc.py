"""ACDC (Automated Cardiac Diagnosis Challenge) layout: read, and a small writer for tests.

Layout::

    root/training/patient001/Info.cfg                   (ED: 1, ES: 12, Group: DCM, ...)
    root/training/patient001/patient001_frame01.nii.gz  (and ..._frame01_gt.nii.gz)
    root/training/patient001/patient001_frame12.nii.gz  (and ..._frame12_gt.nii.gz)
    root/training/patient001/patient001_4d.nii.gz       (the whole cine series; ignored)
    root/testing/patient101/...

`root` may also hold the ``patientNNN/`` folders directly; they are then all training. Each
patient gives two cases, ``patientNNN_ED`` and ``patientNNN_ES``, from the frames Info.cfg names.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import numpy as np

from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.msd import ENDINGS, affine_with_spacing, load_case, save_nifti

CLASS_NAMES = ["background", "RV", "myocardium", "LV"]
"""ACDC label values 0..3."""

MODALITY = "mri"
PHASES = ("ED", "ES")
_PATIENT = re.compile(r"patient\d+")
_SPLIT_DIRS = {"train": "training", "test": "testing"}


def patient_of(case_name: str) -> str:
    """The patient of a case (``patient001_ED`` -> ``patient001``), so splits keep both
    frames of a patient together."""
    for phase in PHASES:
        if case_name.endswith(f"_{phase}"):
            return case_name[: -len(phase) - 1]
    return case_name


def patient_dirs(directory: Path) -> list[Path]:
    """The ``patientNNN`` folders directly inside `directory`, sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and _PATIENT.fullmatch(p.name))


def split_patients(root: Path, split: str) -> list[Path]:
    """Patient folders of `split` ("train" or "test"); empty when the split has none."""
    if split not in _SPLIT_DIRS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if any((root / d).is_dir() for d in _SPLIT_DIRS.values()):
        return patient_dirs(root / _SPLIT_DIRS[split])
    return patient_dirs(root) if split == "train" else []


def read_info(path: Path) -> dict[str, str]:
    """The ``Key: value`` lines of an Info.cfg; it must name integer ED and ES frames."""
    if not path.is_file():
        raise ValueError(f"{path}: Info.cfg not found")
    info = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    for phase in PHASES:
        if not re.fullmatch(r"\d+", info.get(phase, "")):
            raise ValueError(f"{path}: no integer '{phase}: <frame>' line in Info.cfg")
    return info


def _frame_file(patient: Path, frame: int, suffix: str) -> Path | None:
    for ending in ENDINGS:
        path = patient / f"{patient.name}_frame{frame:02d}{suffix}{ending}"
        if path.is_file():
            return path
    return None


def _phase_files(patient: Path, split: str) -> list[tuple[str, Path, Path | None]]:
    """(case name, image file, label file or None) for the ED and ES frames of one patient."""
    info_path = patient / "Info.cfg"
    info = read_info(info_path)
    out = []
    for phase in PHASES:
        frame = int(info[phase])
        image = _frame_file(patient, frame, "")
        if image is None:
            missing = patient / f"{patient.name}_frame{frame:02d}{ENDINGS[0]}"
            raise ValueError(f"{missing}: frame file not found ({phase}: {frame} in {info_path})")
        label = _frame_file(patient, frame, "_gt")
        if label is None and split == "train":
            missing = patient / f"{patient.name}_frame{frame:02d}_gt{ENDINGS[0]}"
            raise ValueError(f"{missing}: label file not found ({phase}: {frame} in {info_path})")
        out.append((f"{patient.name}_{phase}", image, label))
    return out


def acdc_files(root: Path) -> list[Path]:
    """Every file an ACDC dataset at `root` is read from: Info.cfg and the frame files."""
    files = []
    for split in _SPLIT_DIRS:
        for patient in split_patients(root, split):
            files += sorted(
                p
                for p in patient.iterdir()
                if p.is_file() and (p.name == "Info.cfg" or "_frame" in p.name)
            )
    return files


def iter_acdc(
    root: Path, split: str = "train", names: Collection[str] | None = None
) -> Iterator[Case]:
    """Cases of one split ("train" or "test"), two per patient (ED then ES), labels 0..3,
    read one at a time (only those in `names`, when given).

    Training frames must have their ``_gt`` label; test frames get theirs when present.
    """
    for patient in split_patients(root, split):
        for name, image, label in _phase_files(patient, split):
            if names is None or name in names:
                yield load_case(name, image, label, len(CLASS_NAMES))


def read_acdc(root: Path, split: str = "train") -> list[Case]:
    """All cases of one split (see `iter_acdc`)."""
    return list(iter_acdc(root, split))


def write_acdc(
    root: Path,
    patients: Mapping[str, tuple[Case, Case]],
    *,
    split_dir: str = "training",
    frames: tuple[int, int] = (1, 12),
) -> Path:
    """Write ``{"patient001": (ed_case, es_case), ...}`` in the ACDC layout and return `root`.

    Files go to ``root/split_dir/`` (``split_dir=""``: into `root` itself) with Info.cfg naming
    `frames` as ED and ES; a label of None writes no ``_gt`` file. A ``_4d`` file stacking the
    two frames is written too, as in the real dataset. Meant for tests and examples.
    """
    base = Path(root) / split_dir
    for patient, phases in patients.items():
        folder = base / patient
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"ED: {frames[0]}", f"ES: {frames[1]}", "Group: NOR", "Height: 170.0"]
        lines += ["NbFrame: 30", "Weight: 70.0"]
        (folder / "Info.cfg").write_text("\n".join(lines) + "\n")
        for case, frame in zip(phases, frames, strict=True):
            affine = affine_with_spacing(case.affine, case.spacing)
            stem = folder / f"{patient}_frame{frame:02d}"
            save_nifti(np.asarray(case.image, np.float32), affine, Path(f"{stem}.nii.gz"))
            if case.label is not None:
                save_nifti(np.asarray(case.label, np.uint8), affine, Path(f"{stem}_gt.nii.gz"))
        stacked = np.stack([np.asarray(c.image, np.float32) for c in phases], axis=-1)
        affine = affine_with_spacing(phases[0].affine, phases[0].spacing)
        save_nifti(stacked, affine, folder / f"{patient}_4d.nii.gz")
    return Path(root)
