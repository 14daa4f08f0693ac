"""Medical Segmentation Decathlon (MSD) / nnU-Net raw layout: write and read.

Layout::

    root/dataset.json
    root/imagesTr/<case>.nii.gz  or  <case>_0000.nii.gz
    root/labelsTr/<case>.nii.gz
    root/imagesTs/...            root/labelsTs/... (optional)

``dataset.json`` uses the Decathlon dialect: ``"labels": {"0": "background", ...}``,
``"modality": {"0": "MRI"}``, ``"training": [{"image": ..., "label": ...}]`` and
``"test": ["./imagesTs/<case>.nii.gz", ...]``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from selfcleanse_jax.data.cases import Case

_SUFFIX = ".nii.gz"


def affine_with_spacing(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """`affine` with its axis columns rescaled so that the voxel sizes equal `spacing`.

    Keeps orientation and origin; used so a written file's header agrees with `Case.spacing`.
    """
    out = np.array(affine, dtype=np.float64, copy=True)
    norms = np.linalg.norm(out[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    out[:3, :3] = out[:3, :3] / norms * np.asarray(spacing, dtype=np.float64)
    return out


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def write_msd(
    root: Path,
    train_cases: Sequence[Case],
    test_cases: Sequence[Case],
    labels: dict[int, str],
    modality: str = "MRI",
    name: str = "selfcleanse",
    overwrite: bool = False,
) -> Path:
    """Write cases as an MSD dataset at `root` and return `root`.

    Files go to a temporary sibling directory that is renamed into place at the end, so an
    interrupted write leaves nothing half-written. A non-empty `root` is an error unless
    `overwrite` is set and `root` holds a `dataset.json` (the old dataset is then replaced).
    """
    root = Path(root)
    occupied = root.exists() and (not root.is_dir() or any(root.iterdir()))
    if occupied and not (overwrite and (root / "dataset.json").is_file()):
        raise FileExistsError(
            f"{root}: exists and is not empty (overwrite=True replaces a dataset)"
        )
    names = [c.name for c in [*train_cases, *test_cases]]
    if len(set(names)) != len(names):
        raise ValueError(f"{root}: case names must be unique, got {names}")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the dataset should be readable like others
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / sub).mkdir()
        training, test = [], []
        for split, cases in (("Tr", train_cases), ("Ts", test_cases)):
            for case in cases:
                affine = affine_with_spacing(case.affine, case.spacing)
                image_rel = f"./images{split}/{case.name}{_SUFFIX}"
                _save(np.asarray(case.image, np.float32), affine, staging / image_rel)
                label_rel = f"./labels{split}/{case.name}{_SUFFIX}"
                if case.label is not None:
                    _save(np.asarray(case.label, np.uint8), affine, staging / label_rel)
                elif split == "Tr":
                    raise ValueError(f"training case {case.name} has no label")
                if split == "Tr":
                    training.append({"image": image_rel, "label": label_rel})
                else:
                    test.append(image_rel)
        description = {
            "name": name,
            "description": f"{name}, written by selfcleanse_jax",
            "tensorImageSize": "3D",
            "modality": {"0": modality},
            "labels": {str(k): v for k, v in sorted(labels.items())},
            "numTraining": len(training),
            "numTest": len(test),
            "training": training,
            "test": test,
        }
        (staging / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
        if occupied:
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _stem(path: str | Path) -> str:
    name = Path(path).name
    if not name.endswith(_SUFFIX):
        raise ValueError(f"{path}: expected a {_SUFFIX} file")
    return name[: -len(_SUFFIX)]


def _scan_case_names(directory: Path) -> list[str]:
    """Case names of the images in `directory`: `x.nii.gz` and `x_0000.nii.gz` both give `x`."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: directory not found")
    stems = sorted(_stem(p) for p in directory.glob(f"*{_SUFFIX}"))
    first_channel = {s[:-5] for s in stems if s.endswith("_0000")}
    names = []
    for stem in stems:
        if stem.endswith("_0000"):
            names.append(stem[:-5])
        elif re.fullmatch(r".+_\d{4}", stem) and stem[:-5] in first_channel:
            raise ValueError(f"{directory / stem}{_SUFFIX}: multi-channel images are not supported")
        else:
            names.append(stem)
    return names


def _image_file(directory: Path, case: str) -> Path:
    for candidate in (directory / f"{case}{_SUFFIX}", directory / f"{case}_0000{_SUFFIX}"):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"{directory / (case + _SUFFIX)}: image file not found (nor {case}_0000{_SUFFIX})"
    )


def read_nifti(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """A NIfTI file and its data as (H, W, Z); a 2-D image gets Z = 1 and a single-channel
    4-D one is squeezed. Unreadable files and other shapes are a ValueError naming the file."""
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises several types for broken files
        raise ValueError(f"{path}: cannot read NIfTI ({error})") from error
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(
            f"{path}: expected a 3-D volume (or 4-D with one channel), got shape {data.shape}"
        )
    return image, data


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Array as (H, W, Z), affine and voxel spacing of one NIfTI file."""
    image, data = read_nifti(path)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    spacing = (zooms + (1.0, 1.0, 1.0))[:3]
    return data, np.asarray(image.affine, np.float64), spacing


def _label_array(data: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise ValueError(f"{path}: label values must be integers")
    if data.min() < 0 or data.max() > 255:
        raise ValueError(f"{path}: label values must lie in 0..255, got {data.min()}..{data.max()}")
    return data.astype(np.uint8)


def _case_names(root: Path, split: str, description: dict) -> list[str]:
    """Case names from dataset.json when it lists them, else from the image directory."""
    entries = description.get("training" if split == "train" else "test")
    if entries:
        return [_stem(e["image"] if isinstance(e, dict) else e) for e in entries]
    return _scan_case_names(root / ("imagesTr" if split == "train" else "imagesTs"))


def read_msd(root: Path, split: str = "train") -> tuple[list[Case], dict]:
    """Read one split ("train" or "test") of an MSD dataset: (cases, dataset.json contents).

    Training cases must have labels; test labels (labelsTs) are read when present.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise ValueError(f"{json_path}: file not found")
    try:
        description = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path}: invalid JSON ({error})") from error
    images_dir = root / ("imagesTr" if split == "train" else "imagesTs")
    labels_dir = root / ("labelsTr" if split == "train" else "labelsTs")
    cases = []
    for name in _case_names(root, split, description):
        image_path = _image_file(images_dir, name)
        image, affine, spacing = _load(image_path)
        label_path = labels_dir / f"{name}{_SUFFIX}"
        label = None
        if label_path.is_file():
            label_data, _, _ = _load(label_path)
            if label_data.shape != image.shape:
                raise ValueError(
                    f"{label_path}: label shape {label_data.shape} differs from image shape "
                    f"{image.shape} of {image_path.name}"
                )
            label = _label_array(label_data, label_path)
        elif split == "train":
            raise ValueError(f"{label_path}: label file not found")
        cases.append(
            Case(
                name=name,
                image=np.asarray(image, np.float32),
                label=label,
                spacing=spacing,
                affine=affine,
            )
        )
    return cases, description
