"""Medical Segmentation Decathlon (MSD) / nnU-Net raw layout: write and read.

Layout::

    root/dataset.json
    root/imagesTr/<case>.nii.gz  or  <case>_0000.nii.gz
    root/labelsTr/<case>.nii.gz
    root/imagesTs/...            root/labelsTs/... (optional)

``dataset.json`` comes in two dialects, both read:

- Decathlon (what `write_msd` writes): ``"labels": {"0": "background", ...}``,
  ``"modality": {"0": "MRI"}``, ``"training": [{"image": ..., "label": ...}]`` and
  ``"test": ["./imagesTs/<case>.nii.gz", ...]``.
- nnU-Net v2: ``"labels": {"background": 0, ...}``, ``"channel_names": {"0": "MRI"}``,
  ``"file_ending": ".nii.gz"`` (or ``".nii"``) and no file lists (``imagesTr/`` is scanned).

This module also holds the NIfTI reading and validation that the ACDC and LiTS readers share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from selfcleanse_jax import atomic
from selfcleanse_jax.data.cases import Case

_SUFFIX = ".nii.gz"
ENDINGS = (".nii.gz", ".nii")
"""NIfTI file endings the readers accept."""


def affine_with_spacing(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """`affine` with its axis columns rescaled so that the voxel sizes equal `spacing`.

    Keeps orientation and origin; used so a written file's header agrees with `Case.spacing`.
    """
    out = np.array(affine, dtype=np.float64, copy=True)
    norms = np.linalg.norm(out[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    out[:3, :3] = out[:3, :3] / norms * np.asarray(spacing, dtype=np.float64)
    return out


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write `array` to `path` with `affine` as both qform and sform (used by the writers)."""
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
    with atomic.staging_folder(root) as staging:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / sub).mkdir()
        training, test = [], []
        for split, cases in (("Tr", train_cases), ("Ts", test_cases)):
            for case in cases:
                affine = affine_with_spacing(case.affine, case.spacing)
                image_rel = f"./images{split}/{case.name}{_SUFFIX}"
                save_nifti(np.asarray(case.image, np.float32), affine, staging / image_rel)
                label_rel = f"./labels{split}/{case.name}{_SUFFIX}"
                if case.label is not None:
                    save_nifti(np.asarray(case.label, np.uint8), affine, staging / label_rel)
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
    return root


def nifti_stem(path: str | Path, endings: Sequence[str] = ENDINGS) -> str | None:
    """File name of `path` without its NIfTI ending, or None when it has none of `endings`."""
    name = Path(path).name
    for ending in endings:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def _stem(path: str | Path, ending: str) -> str:
    stem = nifti_stem(path, (ending,))
    if stem is None:
        raise ValueError(f"{path}: expected a {ending} file")
    return stem


def _scan_case_names(directory: Path, ending: str) -> list[str]:
    """Case names of the images in `directory`: `x<ending>` and `x_0000<ending>` both give `x`.

    Hidden files (macOS `._x.nii.gz` forks ship with the Decathlon archives) are skipped.
    """
    if not directory.is_dir():
        raise ValueError(f"{directory}: directory not found")
    files = [p for p in directory.glob(f"*{ending}") if not p.name.startswith(".")]
    stems = sorted(_stem(p, ending) for p in files)
    first_channel = {s[:-5] for s in stems if s.endswith("_0000")}
    names = []
    for stem in stems:
        if stem.endswith("_0000"):
            names.append(stem[:-5])
        elif re.fullmatch(r".+_\d{4}", stem) and stem[:-5] in first_channel:
            raise ValueError(f"{directory / stem}{ending}: multi-channel images are not supported")
        else:
            names.append(stem)
    return names


def _image_file(directory: Path, case: str, ending: str, listed: bool) -> Path:
    for candidate in (directory / f"{case}{ending}", directory / f"{case}_0000{ending}"):
        if candidate.is_file():
            return candidate
    where = ", named in dataset.json" if listed else ""
    raise ValueError(
        f"{directory / (case + ending)}: image file not found (nor {case}_0000{ending}){where}"
    )


def read_nifti(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """A NIfTI file and its data as (H, W, Z); a 2-D image gets Z = 1 and a single-channel
    4-D one is squeezed. Unreadable or truncated files (of any compression) and other shapes
    are a ValueError naming the file."""
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel, gzip and mmap raise several types for broken files
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path}: cannot read NIfTI, truncated or corrupt ({message})") from error
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 4:
        raise ValueError(
            f"{path}: 4-D image with {data.shape[-1]} channels, expected a 3-D volume "
            f"(multi-channel images are not supported), shape {data.shape}"
        )
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


def _label_array(data: np.ndarray, path: Path, num_classes: int | None = None) -> np.ndarray:
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise ValueError(f"{path}: label values must be integers")
    if data.min() < 0 or data.max() > 255:
        raise ValueError(f"{path}: label values must lie in 0..255, got {data.min()}..{data.max()}")
    if num_classes is not None and data.max() > num_classes - 1:
        raise ValueError(
            f"{path}: label value {int(data.max())} exceeds the {num_classes} classes named "
            f"(0..{num_classes - 1})"
        )
    return data.astype(np.uint8)


def load_case(
    name: str, image_path: Path, label_path: Path | None, num_classes: int | None
) -> Case:
    """Read one image (and its label, when given) as a raw `Case` in file orientation.

    Checks what later stages rely on: finite intensities, a label of the image's shape and
    affine (np.allclose, atol 1e-3), with integer values below `num_classes` (None: no bound).
    """
    image, affine, spacing = _load(image_path)
    if not np.all(np.isfinite(image)):
        count = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise ValueError(
            f"{image_path}: image has NaN or infinite intensities ({count} of {image.size} voxels)"
        )
    label = None
    if label_path is not None:
        label_data, label_affine, _ = _load(label_path)
        if label_data.shape != image.shape:
            raise ValueError(
                f"{label_path}: label shape {label_data.shape} differs from image shape "
                f"{image.shape} of {image_path.name}"
            )
        if not np.allclose(label_affine, affine, atol=1e-3):
            difference = float(np.max(np.abs(label_affine - affine)))
            raise ValueError(
                f"{label_path}: label affine differs from the image affine of {image_path.name} "
                f"(largest difference {difference:.4g})"
            )
        label = _label_array(label_data, label_path, num_classes)
    return Case(
        name=name,
        image=np.asarray(image, np.float32),
        label=label,
        spacing=spacing,
        affine=affine,
    )


def _label_names(description: dict, json_path: Path) -> list[str]:
    """Class names by label value from either dialect's ``labels``; values must be 0..N-1."""
    labels = description.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{json_path}: no 'labels' mapping")
    by_value = {}
    for key, value in labels.items():
        if isinstance(value, list):
            raise ValueError(
                f"{json_path}: region-based label {key!r}: {value} is not supported "
                "(each label must be one integer)"
            )
        if isinstance(value, str) and re.fullmatch(r"\d+", str(key)):
            by_value[int(key)] = value  # Decathlon: "1": "name"
        elif isinstance(value, int) and not isinstance(value, bool):
            by_value[value] = str(key)  # nnU-Net v2: "name": 1
        else:
            raise ValueError(f"{json_path}: cannot read label entry {key!r}: {value!r}")
    if sorted(by_value) != list(range(len(by_value))):
        raise ValueError(
            f"{json_path}: label values must be 0..{len(by_value) - 1}, got {sorted(by_value)}"
        )
    return [by_value[i] for i in range(len(by_value))]


def msd_info(description: dict, json_path: Path = Path("dataset.json")) -> tuple[list[str], str]:
    """(class names in label order, modality "mri" or "ct") from either dataset.json dialect.

    Modality is "ct" when the first channel is named CT (any case), otherwise "mri".
    """
    channels = description.get("channel_names") or description.get("modality") or {}
    if not isinstance(channels, dict):
        raise ValueError(f"{json_path}: 'channel_names'/'modality' must be a mapping")
    if len(channels) > 1:
        raise ValueError(
            f"{json_path}: {len(channels)} channels named, multi-channel images are not supported"
        )
    first = str(next(iter(channels.values()), ""))
    modality = "ct" if first.strip().lower() == "ct" else "mri"
    return _label_names(description, json_path), modality


def _file_ending(description: dict, json_path: Path) -> str:
    ending = description.get("file_ending", _SUFFIX)
    if ending not in ENDINGS:
        raise ValueError(f"{json_path}: file_ending {ending!r} is not one of {ENDINGS}")
    return ending


def read_dataset_json(root: Path) -> dict:
    """The parsed ``root/dataset.json``; missing or invalid JSON is a ValueError naming it."""
    json_path = Path(root) / "dataset.json"
    if not json_path.is_file():
        raise ValueError(f"{json_path}: file not found")
    try:
        description = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path}: invalid JSON ({error})") from error
    if not isinstance(description, dict):
        raise ValueError(f"{json_path}: expected a JSON object")
    return description


def _listed(entry: object, key: str, json_path: Path) -> str:
    value = entry.get(key) if isinstance(entry, dict) else entry
    if not isinstance(value, str):
        raise ValueError(f"{json_path}: cannot read file entry {entry!r}")
    return value


def _entries(root: Path, split: str, description: dict) -> list[tuple[str, Path, Path, bool]]:
    """(case name, images dir, label file, listed in dataset.json) for each case of `split`.

    Cases come from dataset.json's file lists when present, else from the image directory.
    """
    json_path = root / "dataset.json"
    ending = _file_ending(description, json_path)
    sub = "Tr" if split == "train" else "Ts"
    listed = description.get("training" if split == "train" else "test")
    if listed:
        out = []
        for entry in listed:
            image_rel = _listed(entry, "image", json_path)
            name = _stem(image_rel, ending)
            images_dir = (root / image_rel).parent
            if isinstance(entry, dict) and "label" in entry:
                label_path = root / _listed(entry, "label", json_path)
            else:
                label_path = root / f"labels{sub}" / f"{name}{ending}"
            out.append((name, images_dir, label_path, True))
        return out
    images_dir = root / f"images{sub}"
    names = _scan_case_names(images_dir, ending)
    if not names and split == "train":
        raise ValueError(f"{images_dir}: empty folder, no {ending} images found")
    return [(n, images_dir, root / f"labels{sub}" / f"{n}{ending}", False) for n in names]


def msd_files(root: Path) -> list[Path]:
    """Every file an MSD dataset at `root` is read from (dataset.json and the NIfTI files)."""
    root = Path(root)
    files = [root / "dataset.json"]
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        if (root / sub).is_dir():
            files += sorted(
                p
                for p in (root / sub).iterdir()
                if p.is_file() and not p.name.startswith(".") and nifti_stem(p) is not None
            )
    return files


def iter_msd(
    root: Path, split: str = "train", names: Collection[str] | None = None
) -> Iterator[Case]:
    """The cases of one split ("train" or "test") of an MSD dataset, read one at a time
    (only those in `names`, when given).

    Training cases must have labels; test labels (labelsTs) are read when present. Labels may
    not exceed the classes dataset.json names. Every file is checked to exist before the first
    case is read.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    description = read_dataset_json(root)
    class_names, _ = msd_info(description, root / "dataset.json")
    ending = _file_ending(description, root / "dataset.json")
    files = []
    for name, images_dir, label_path, listed in _entries(root, split, description):
        image_path = _image_file(images_dir, name, ending, listed)
        if not label_path.is_file():
            if split == "train":
                where = ", named in dataset.json" if listed else ""
                raise ValueError(f"{label_path}: label file not found{where}")
            label_path = None
        files.append((name, image_path, label_path))
    wanted = [entry for entry in files if names is None or entry[0] in names]
    return (load_case(*entry, len(class_names)) for entry in wanted)


def read_msd(root: Path, split: str = "train") -> tuple[list[Case], dict]:
    """Read one split of an MSD dataset (see `iter_msd`): (cases, dataset.json contents)."""
    return list(iter_msd(root, split)), read_dataset_json(Path(root))


def training_label_files(root: Path) -> dict[str, Path]:
    """Each training case's label file by case name, in the order `read_msd` reads the
    cases: as dataset.json lists it, else `labelsTr/<case><file_ending>`."""
    root = Path(root)
    entries = _entries(root, "train", read_dataset_json(root))
    return {name: label_path for name, _, label_path, _ in entries}
