"""Segment NIfTI volumes with a trained run: `predict(workdir, input_path, output_dir)`.

Every volume is prepared exactly as training prepared its cases (`prepare_volume` with the
run's `PreprocessSettings`: reorientation, intensity normalisation, resizing or resampling and
crop/pad); the predicted labels are mapped back onto the input's array by `restore_labels` and
saved as uint8 NIfTI with the input's shape, affine and qform/sform, under the input's file name
(a `_0000` channel suffix dropped).

The model comes from `inference.load_trained`: the run's records and latest checkpoint, no
optimizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from selfcleanse_jax import atomic
from selfcleanse_jax.data.msd import nifti_stem, read_nifti
from selfcleanse_jax.data.preprocess import prepare_volume, restore_labels
from selfcleanse_jax.inference import TrainedModel, load_trained

# -- NIfTI in, NIfTI out ---------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    return nifti_stem(path) is not None


def input_files(input_path: str | Path) -> list[Path]:
    """A NIfTI file, or the `.nii` / `.nii.gz` files of a directory (sorted)."""
    path = Path(input_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_nifti(p))
        if not files:
            raise ValueError(f"{path}: no .nii or .nii.gz files found")
        return files
    if not path.is_file():
        raise ValueError(f"{path}: file or directory not found")
    if not _is_nifti(path):
        raise ValueError(f"{path}: expected a .nii or .nii.gz file")
    return [path]


def output_name(path: Path) -> str:
    """The input's file name, without a `_0000` channel suffix."""
    stem = nifti_stem(path)
    ending = path.name[len(stem) :]
    return stem.removesuffix("_0000") + ending


def read_volume(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """The image and its data as (H, W, Z) float32 (a single-channel 4-D image is squeezed)."""
    image, data = read_nifti(path)
    data = np.asarray(data, np.float32)
    if min(data.shape) < 1:
        raise ValueError(f"{path}: empty volume of shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: image contains NaN or infinite values")
    return image, data


def voxel_spacing(image: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    """The voxel sizes of the header, as the data loader reads them (missing ones are 1 mm)."""
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return (zooms + (1.0, 1.0, 1.0))[:3]


def segment_volume(
    model: TrainedModel,
    volume: np.ndarray,
    affine: np.ndarray,
    spacing: tuple[float, float, float],
    flip_tta: bool = False,
) -> np.ndarray:
    """Labels uint8 of a raw volume (H, W, Z) with its affine and voxel spacing, of the
    volume's exact shape and orientation; the volume is prepared as training prepared cases."""
    if model.model_config.in_channels != 1:
        raise ValueError(f"the model expects {model.model_config.in_channels} input channels")
    slices, inverse = prepare_volume(volume, affine, spacing, model.preprocess)
    return restore_labels(np.moveaxis(model.labels(slices, flip_tta), 0, -1), inverse)


def save_labels(labels: np.ndarray, like: nib.spatialimages.SpatialImage, path: Path) -> None:
    """uint8 NIfTI with `like`'s affine, qform and sform; written to a temp file, then moved."""
    header = like.header.copy() if isinstance(like, nib.Nifti1Image) else None
    out = nib.Nifti1Image(np.asarray(labels, np.uint8), like.affine, header=header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    if isinstance(like, nib.Nifti1Image):
        qform, qcode = like.get_qform(coded=True)
        sform, scode = like.get_sform(coded=True)
        out.set_qform(like.affine if qform is None else qform, code=int(qcode or 0))
        out.set_sform(like.affine if sform is None else sform, code=int(scode or 0))
        if not qcode and not scode:
            out.set_sform(like.affine, code=2)
    with atomic.replacing_path(path) as partial:
        out.to_filename(partial)


def predict(
    workdir: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    flip_tta: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Segment a NIfTI file or a directory of them; return the written label files.

    Each output is `output_dir/<input name>` (`_0000` dropped), uint8, of the input's exact
    shape and affine. With `flip_tta` the softmax of each slice is averaged with that of its
    horizontal mirror. Raises ValueError naming the file for unreadable or non-3-D inputs.
    Masks are written to a hidden sibling folder and moved into `output_dir` only once every
    volume has been segmented, so an error leaves `output_dir` as it was.
    """
    files = input_files(input_path)
    output_dir = Path(output_dir)
    targets = [output_dir / output_name(f) for f in files]
    for source, target in zip(files, targets, strict=True):
        if target.resolve() == source.resolve():
            raise ValueError(f"{target}: output would overwrite the input; choose another --output")
    if len(set(targets)) < len(targets):
        raise ValueError(f"{input_path}: several inputs would give the same output name")
    model = load_trained(workdir)
    with atomic.staging_folder(output_dir) as staging:
        for source, target in tqdm(
            list(zip(files, targets, strict=True)),
            desc="predict",
            unit="volume",
            disable=not progress,
        ):
            image, volume = read_volume(source)
            try:
                labels = segment_volume(model, volume, image.affine, voxel_spacing(image), flip_tta)
            except ValueError as error:
                raise ValueError(f"{source}: {error}") from error
            save_labels(labels.reshape(image.shape), image, staging / target.name)
        output_dir.mkdir(exist_ok=True)
        for target in targets:
            os.replace(staging / target.name, target)
    return targets
