"""Preprocessing of volumes for training and prediction, its exact inverse, and its disk cache.

One geometry serves both: a volume is (optionally) reoriented to the closest canonical RAS+
orientation, with the axis it is sliced along last (S, or with `slice_axis="auto"` the axis of
a stack of thick slices, whichever world axis it points to); its intensities are normalised by
modality; each slice is then either resized to (image_size, image_size), or resampled in-plane
to `target_spacing` mm and centre-cropped or padded to (image_size, image_size). Training cuts
prepared cases into slices (`prepare_case`); prediction prepares a volume the same way
(`prepare_volume`) and maps the predicted labels back onto the original array
(`restore_labels`). Resampling is pixel-area aligned (`scipy.ndimage.zoom`, `grid_mode`), so a
resized slice's spacing is exactly `spacing * old_size / new_size`.

Preparing a real dataset is slow, so its slice table is cached on disk (`cached_slice_table`)
under a key of the source files' paths, sizes and mtimes and of the settings (`cache_key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
import numpy as np
from nibabel import orientations
from scipy import ndimage

from selfcleanse_jax import atomic
from selfcleanse_jax.data.cases import Case, SliceTable

log = logging.getLogger(__name__)

MODALITIES = ("mri", "ct")
SLICE_AXES = ("auto", "R", "A", "S")
ANISOTROPY = 2.0
"""`slice_axis="auto"` slices along the coarsest axis when its spacing is at least this many
times the others' (a stack of thick slices, e.g. cardiac short-axis MRI), else along S."""
FORMAT_VERSION = 1
"""Version of the preprocessing and of the cache files; part of every cache key."""

_RAS = orientations.axcodes2ornt("RAS")
_TABLE_FIELDS = ("images", "labels", "case_index", "z", "case_names", "spacing")


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    """How volumes become model inputs; training and prediction must use the same settings.

    `ct_window` is the (low, high) Hounsfield window of CT; `target_spacing` is the in-plane
    spacing in mm to resample to (0: resize each slice to image_size instead).
    """

    image_size: int
    modality: str = "mri"
    ct_window: tuple[float, float] = (-200.0, 250.0)
    canonical: bool = False
    target_spacing: float = 0.0
    slice_axis: str = "S"

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if len(self.ct_window) != 2 or not np.all(np.isfinite(self.ct_window)):
            raise ValueError(f"ct_window must be two finite numbers, got {self.ct_window}")
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window must have low < high, got {self.ct_window}")
        if not np.isfinite(self.target_spacing) or self.target_spacing < 0:
            raise ValueError(f"target_spacing must be >= 0 mm, got {self.target_spacing}")
        if self.slice_axis not in SLICE_AXES:
            raise ValueError(f"slice_axis must be one of {SLICE_AXES}, got {self.slice_axis!r}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, modality: str) -> PreprocessSettings:
        """Settings from `config.data` (an older run's config read back with `with_defaults`,
        which gives keys it lacks that run's own values); a non-empty `data.modality`
        overrides `modality` (what the dataset says)."""
        data = config.data
        chosen = str(data.modality or modality).strip().lower()
        if not chosen:
            raise ValueError("no modality: set data.modality to one of mri, ct")
        return cls(
            image_size=int(data.image_size),
            modality=chosen,
            ct_window=(float(data.ct_window[0]), float(data.ct_window[1])),
            canonical=bool(data.canonical),
            target_spacing=float(data.target_spacing),
            slice_axis=str(data.slice_axis),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Inverse:
    """What `restore_labels` needs to put prepared-grid labels back onto the original array."""

    shape: tuple[int, int, int]  # the original array's shape
    to_original: np.ndarray  # nibabel orientation transform: prepared axes -> original axes
    oriented_shape: tuple[int, int]  # in-plane shape after reorientation, before resampling
    resampled_shape: tuple[int, int]  # in-plane shape after resampling, before crop/pad
    starts: tuple[int, int]  # where the image_size window starts (negative: padding)


def normalize_volume(image: np.ndarray) -> np.ndarray:
    """Z-score a volume after clipping to its 0.5 / 99.5 percentiles (MRI).

    Clipping first keeps a few extreme voxels (vessels, artefacts) from setting the scale;
    per-volume statistics remove scanner- and case-dependent intensity scaling.
    """
    image = np.asarray(image, np.float32)
    lo, hi = np.percentile(image, [0.5, 99.5])
    clipped = np.clip(image, lo, hi)
    std = float(clipped.std())
    return ((clipped - clipped.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def normalize_intensity(image: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """MRI: `normalize_volume`. CT: clip to `ct_window` and scale linearly to [0, 1], which keeps
    Hounsfield units comparable across scans (a fixed map, not per-volume statistics)."""
    if settings.modality == "ct":
        lo, hi = settings.ct_window
        return ((np.clip(np.asarray(image, np.float32), lo, hi) - lo) / (hi - lo)).astype(
            np.float32
        )
    return normalize_volume(image)


def _orientation(affine: np.ndarray) -> np.ndarray:
    ornt = orientations.io_orientation(np.asarray(affine, np.float64))
    if np.isnan(ornt).any():
        raise ValueError(f"affine has no orientation for some axis: {np.asarray(affine).tolist()}")
    return ornt


def slice_codes(affine: np.ndarray, spacing: Sequence[float], slice_axis: str = "S") -> str:
    """The canonical axis codes to reorient to, with the slicing axis last: "RAS" for axial
    slices, "ASR" for sagittal, "RSA" for coronal. `slice_axis="auto"` picks the world axis
    of the volume's coarsest spacing when it is `ANISOTROPY` times the others', else S."""
    if slice_axis == "auto":
        ras_spacing = [0.0, 0.0, 0.0]
        for axis, (world, _) in enumerate(_orientation(affine)):
            ras_spacing[int(world)] = float(spacing[axis])
        coarsest = int(np.argmax(ras_spacing))
        others = max(s for i, s in enumerate(ras_spacing) if i != coarsest)
        slice_axis = "RAS"[coarsest] if ras_spacing[coarsest] >= ANISOTROPY * others else "S"
    return "".join(c for c in "RAS" if c != slice_axis) + slice_axis


def to_canonical(
    array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], codes: str = "RAS"
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], np.ndarray]:
    """`array` reoriented to the closest canonical orientation of `affine` whose axes point to
    `codes` (RAS+, or a permutation of it that puts another slicing axis last).

    Returns (array, affine, spacing, transform): the affine and spacing of the reoriented array
    and the nibabel orientation transform that maps it back to the original axes.
    """
    ornt = _orientation(affine)
    target = orientations.axcodes2ornt(tuple(codes))
    forward = orientations.ornt_transform(ornt, target)
    out = orientations.apply_orientation(array, forward)
    out_affine = np.asarray(affine, np.float64) @ orientations.inv_ornt_aff(forward, array.shape)
    out_spacing = [0.0, 0.0, 0.0]
    for axis, (destination, _) in enumerate(forward):
        out_spacing[int(destination)] = float(spacing[axis])
    return out, out_affine, tuple(out_spacing), orientations.ornt_transform(target, ornt)


def _resize(array: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """`array` (H, W, Z) resampled in-plane to `shape`, pixel-area aligned; a no-op when equal."""
    if array.shape[:2] == shape:
        return array
    factors = (shape[0] / array.shape[0], shape[1] / array.shape[1], 1.0)
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)


def _window(length: int, size: int, start: int) -> tuple[slice, slice]:
    """(source, target) slices that copy the overlap of [start, start + size) and [0, length)."""
    lo, hi = max(start, 0), min(start + size, length)
    return slice(lo, hi), slice(lo - start, hi - start)


def _crop_or_pad(array: np.ndarray, size: int, starts: tuple[int, int], fill: float) -> np.ndarray:
    out = np.full((size, size, *array.shape[2:]), fill, array.dtype)
    (src0, dst0), (src1, dst1) = (_window(array.shape[i], size, starts[i]) for i in (0, 1))
    out[dst0, dst1] = array[src0, src1]
    return out


def _uncrop(labels: np.ndarray, shape: tuple[int, int], starts: tuple[int, int]) -> np.ndarray:
    size = labels.shape[0]
    out = np.zeros((*shape, *labels.shape[2:]), labels.dtype)
    (src0, dst0), (src1, dst1) = (_window(shape[i], size, starts[i]) for i in (0, 1))
    out[src0, src1] = labels[dst0, dst1]
    return out


def _prepare(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    spacing: Sequence[float],
    settings: PreprocessSettings,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float], np.ndarray, Inverse]:
    """The one preparation path: (image, label, spacing, affine) on the prepared grid + Inverse."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"expected a non-empty 3-D volume, got shape {image.shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {tuple(spacing)}")
    if label is not None and label.shape != image.shape:
        raise ValueError(f"label shape {label.shape} != image shape {image.shape}")
    shape = tuple(int(n) for n in image.shape)
    to_original = orientations.ornt_transform(_RAS, _RAS)
    affine = np.asarray(affine, np.float64)
    spacing = tuple(float(s) for s in spacing)
    if settings.canonical:
        codes = slice_codes(affine, spacing, settings.slice_axis)
        if label is not None:
            label = to_canonical(label, affine, spacing, codes)[0]
        image, affine, spacing, to_original = to_canonical(image, affine, spacing, codes)
    if normalize:
        image = normalize_intensity(image, settings)
    size = settings.image_size
    oriented = (image.shape[0], image.shape[1])
    if settings.target_spacing > 0:
        resampled = tuple(
            max(1, round(n * s / settings.target_spacing))
            for n, s in zip(oriented, spacing[:2], strict=True)
        )
    else:
        resampled = (size, size)
    starts = tuple((n - size) // 2 for n in resampled)
    fill = float(image.min())
    image = _crop_or_pad(_resize(image, resampled, order=1), size, starts, fill)
    if label is not None:
        label = _crop_or_pad(_resize(np.asarray(label, np.uint8), resampled, 0), size, starts, 0)
    scale = [oriented[i] / resampled[i] for i in (0, 1)]
    grid = np.eye(4)
    for i in (0, 1):
        grid[i, i] = scale[i]
        grid[i, 3] = (starts[i] + 0.5) * scale[i] - 0.5
    inverse = Inverse(shape, to_original, oriented, resampled, starts)
    out_spacing = (spacing[0] * scale[0], spacing[1] * scale[1], spacing[2])
    return image, label, out_spacing, affine @ grid, inverse


def prepare_case(case: Case, settings: PreprocessSettings, *, normalize: bool = True) -> Case:
    """`case` on the prepared grid: reoriented, normalised, resized or resampled and cropped or
    padded to (image_size, image_size, Z); the label (uint8) follows by nearest neighbour, and
    spacing and affine describe the new grid. `normalize=False` keeps the intensities (for data
    that is already normalised)."""
    try:
        image, label, spacing, affine, _ = _prepare(
            case.image, case.label, case.affine, case.spacing, settings, normalize
        )
    except ValueError as error:
        raise ValueError(f"case {case.name}: {error}") from error
    return Case(case.name, image, label, spacing, affine)


def prepare_volume(
    volume: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    settings: PreprocessSettings,
) -> tuple[np.ndarray, Inverse]:
    """Model inputs (Z, S, S, 1) float32 of a raw volume (H, W, Z), prepared as `prepare_case`
    prepares training cases, and the `Inverse` that `restore_labels` needs."""
    image, _, _, _, inverse = _prepare(volume, None, affine, spacing, settings)
    return np.moveaxis(image, -1, 0)[..., None], inverse


def restore_labels(labels: np.ndarray, inverse: Inverse) -> np.ndarray:
    """Labels (S, S, Z) on the prepared grid mapped back onto the original array (uint8, its exact
    shape and orientation): crop/pad undone (outside the window is 0), resampling undone by
    nearest neighbour, reorientation undone."""
    labels = np.asarray(labels, np.uint8)
    labels = _uncrop(labels, inverse.resampled_shape, inverse.starts)
    labels = _resize(labels, inverse.oriented_shape, order=0)
    labels = orientations.apply_orientation(labels, inverse.to_original)
    if labels.shape != inverse.shape:
        raise ValueError(f"restored labels have shape {labels.shape}, expected {inverse.shape}")
    return np.ascontiguousarray(labels)


# -- the on-disk cache -----------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/selfcleanse_jax`, or `~/.cache/selfcleanse_jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selfcleanse_jax"


def cache_key(files: Sequence[Path], settings: PreprocessSettings, extra: dict) -> str:
    """A hash of the source files (absolute path, size, mtime_ns), the settings, `extra` (what
    else shapes the table: layout, split, classes, ...) and `FORMAT_VERSION`.

    Touching or replacing a file, or changing any of these, gives a new key.
    """
    sources = []
    for path in files:
        stat = Path(path).stat()
        sources.append([str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns])
    content = {
        "version": FORMAT_VERSION,
        "files": sources,
        "settings": dataclasses.asdict(settings),
        "extra": extra,
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def save_slice_table(path: Path, table: SliceTable) -> None:
    """Write `table` as an npz file: to a temp file in the same folder, then moved into place."""
    with atomic.replacing(path, "wb") as f:
        np.savez(
            f,
            images=table.images,
            labels=table.labels,
            case_index=table.case_index,
            z=table.z,
            case_names=np.asarray(table.case_names, dtype=str),
            spacing=table.spacing,
        )


def load_slice_table(path: Path) -> SliceTable:
    """A table written by `save_slice_table`; a ValueError naming the file if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in _TABLE_FIELDS}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a slice table ({error})") from error
    return SliceTable(
        images=arrays["images"],
        labels=arrays["labels"],
        case_index=arrays["case_index"],
        z=arrays["z"],
        case_names=[str(n) for n in arrays["case_names"]],
        spacing=arrays["spacing"],
    )


def cached_slice_table(cache_dir: Path, key: str, build: Callable[[], SliceTable]) -> SliceTable:
    """The table cached as `cache_dir/<key>.npz`; built with `build()` and saved when absent (or
    unreadable)."""
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        try:
            table = load_slice_table(path)
        except ValueError as error:
            log.warning("rebuilding the slice table: %s", error)
        else:
            log.info("loaded %d preprocessed slices from %s", len(table), path)
            return table
    log.info("no cached slices at %s: preprocessing", path)
    table = build()
    save_slice_table(path, table)
    log.info("preprocessed %d slices, cached at %s", len(table), path)
    return table
