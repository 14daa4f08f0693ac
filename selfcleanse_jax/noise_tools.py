"""Label-noise tools on whole datasets: a corrupted copy of an MSD dataset, and a gallery.

`corrupt_dataset` corrupts the training labels of an MSD-layout dataset slice by slice
(2D, along the last axis) with any model or preset of `selfcleanse_jax.noise`. Sample ids
are a running index over the training cases in the order dataset.json lists them (the
order `read_msd` returns) and, within a case, over z: case 0 slices 0..Z0-1 get ids
0..Z0-1, case 1 slices get Z0..Z0+Z1-1, and so on. A slice's noise therefore depends only
on (seed, id, params), and the same dataset corrupted twice with the same settings gives
byte-identical labels.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from selfcleanse_jax import atomic, noise


def _num_classes(description: dict, cases: list) -> int:
    labels = description.get("labels") or {}
    keys = [int(k) for k in labels if str(k).lstrip("-").isdigit()]
    observed = [int(v) for c in cases for v in np.unique(c.label) if v != noise.IGNORE_INDEX]
    return max([*keys, *observed, 1]) + 1


def _label_files_within(root: Path, files: Mapping[str, Path]) -> dict[str, Path]:
    """The label files relative to the dataset folder `root` (ValueError for one outside)."""
    relative = {}
    for name, path in files.items():
        try:
            relative[name] = path.resolve().relative_to(root.resolve())
        except ValueError:
            raise ValueError(
                f"{path}: the label file of {name} lies outside {root}; the noisy copy can "
                "only replace files inside the dataset folder"
            ) from None
    return relative


def corrupt_dataset(
    input_root: Path,
    output_root: Path,
    kind: str,
    rate: float | None,
    seed: int,
    params: Mapping[str, Any] | None = None,
) -> Path:
    """Write a copy of the MSD dataset `input_root` at `output_root` with noisy training labels.

    `rate` None (or negative) takes the default of `kind` (a protocol's own rate).

    The copy holds everything of the input (dataset.json, imagesTr, imagesTs, labelsTs, ...)
    byte for byte, except the training labels (in `labelsTr/`, or where dataset.json lists
    them; `.nii` or `.nii.gz`), whose volumes are corrupted slice by slice (see the module
    docstring for the sample ids) and written back under their own names; the clean training
    labels go to `labelsTr_clean/` under the same file names, and the noise card, with each
    record's "case" and "z", to `noise_card.json`. Volumes with no noisy slice are copied
    unchanged. Everything is written to a temporary sibling
    directory renamed into place at the end. An existing non-empty `output_root` is refused
    (ValueError). Returns `output_root`.
    """
    import nibabel as nib

    from selfcleanse_jax.data.msd import msd_info, read_msd, training_label_files

    input_root, output_root = Path(input_root), Path(output_root)
    if output_root.exists() and (not output_root.is_dir() or any(output_root.iterdir())):
        raise ValueError(f"{output_root}: exists and is not empty; choose a new output directory")
    if output_root.resolve() == input_root.resolve():
        raise ValueError(f"{output_root}: output must differ from the input")
    cases, description = read_msd(input_root, "train")
    label_files = _label_files_within(input_root, training_label_files(input_root))
    num_classes = _num_classes(description, cases)
    class_names = msd_info(description, input_root / "dataset.json")[0]
    rate = noise.resolve_rate(kind, rate)
    resolved = {} if kind == "none" else noise.resolve_params(kind, params)
    if resolved.get("classes") == noise.STRUCTURE:
        resolved["classes"] = noise.structure_classes(class_names)

    realisations = []
    start = 0
    for case in cases:
        volume = np.moveaxis(np.asarray(case.label), -1, 0)  # (Z, H, W)
        ids = np.arange(start, start + len(volume))
        realisations.append(
            noise.apply_noise(volume, kind, rate, seed, num_classes, params=resolved, ids=ids)
        )
        start += len(volume)

    with atomic.staging_folder(output_root) as staging:
        shutil.copytree(input_root, staging, dirs_exist_ok=True, symlinks=False)
        staging.chmod(0o755)
        clean_dir = staging / "labelsTr_clean"
        if clean_dir.exists():
            raise ValueError(f"{input_root}: already holds labelsTr_clean/ (a corrupted copy?)")
        clean_dir.mkdir()
        for relative in label_files.values():
            shutil.copy2(staging / relative, clean_dir / relative.name)
        records = []
        for case, realisation in zip(cases, realisations, strict=True):
            for z, record in enumerate(realisation.records):
                records.append({"case": case.name, "z": z, **record})
            if not realisation.is_noisy.any():
                continue
            path = staging / label_files[case.name]  # its own name and ending (.nii, .nii.gz)
            original = nib.load(path)
            shape = original.shape
            noisy = np.moveaxis(realisation.noisy_labels, 0, -1).reshape(shape)
            header = original.header.copy()
            header.set_data_dtype(np.uint8)
            image = nib.Nifti1Image(noisy.astype(np.uint8), original.affine, header)
            path.unlink()
            nib.save(image, path)
        is_noisy = np.concatenate([r.is_noisy for r in realisations]) if realisations else []
        card = noise.NoiseRealisation(
            noisy_labels=np.zeros((0, 0, 0), np.uint8),
            is_noisy=np.asarray(is_noisy, bool),
            records=records,
            kind=kind,
            rate=float(rate),
            seed=int(seed),
            params=noise._jsonable(resolved),
            num_classes=num_classes,
            model="none" if kind == "none" else noise.model_of(kind),
        )
        text = json.loads(card.to_json())
        text = {
            "input": str(input_root.resolve()),
            "slicing": "2D slices along the last axis; id = running index over (case, z)",
            **text,
        }
        (staging / "noise_card.json").write_text(json.dumps(text, indent=1) + "\n")
        os.replace(staging, output_root)
    return output_root


GALLERY_KINDS = (
    "boundary",
    "missing",
    "markov",
    "markov-expand",
    "markov-shrink",
    "affine",
    "edge",
    "mixed",
)
_COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple")


def gallery(
    output_png: Path,
    seed: int = 0,
    image_size: int = 128,
    kinds: tuple[str, ...] = GALLERY_KINDS,
) -> Path:
    """Draw every noise model (and the Markov presets) on one phantom slice: one panel per
    kind, the clean contours solid and the noisy ones dashed over the image, titled with the
    kind and the mean Dice of noisy vs clean. Writes `output_png` and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfcleanse_jax.data.phantom import make_case

    case = make_case(seed, 0, image_size, num_slices=8)
    z = int(np.argmax([np.unique(case.label[..., k]).size for k in range(case.label.shape[-1])]))
    image, clean = case.image[..., z], case.label[..., z].astype(np.uint8)
    classes = [int(c) for c in noise.foreground_classes(clean)]
    num_classes = max(classes) + 1
    cols = 3
    rows = int(np.ceil((len(kinds) + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows))
    axes = np.atleast_1d(axes).ravel()
    panels = [("clean", clean, None), *[(k, None, k) for k in kinds]]
    for ax, (title, label, kind) in zip(axes, panels, strict=False):
        if kind is not None:
            realisation = noise.apply_noise(clean[None], kind, 1.0, seed, num_classes)
            label = realisation.noisy_labels[0]
            record = realisation.records[0]
            used = f" ({record['model']})" if kind == "mixed" and "model" in record else ""
            title = f"{kind}{used}\nDice {record['dice_noisy_vs_clean']:.3f}"
        ax.imshow(image, cmap="gray")
        for i, c in enumerate(classes):
            colour = _COLOURS[i % len(_COLOURS)]
            if (clean == c).any():
                ax.contour((clean == c), levels=[0.5], colors=colour, linewidths=1.0)
            if kind is not None and (label == c).any():
                ax.contour(
                    (label == c), levels=[0.5], colors=colour, linewidths=1.2, linestyles="--"
                )
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"label noise on a phantom slice (seed {seed}, {image_size} px): clean solid, noisy dashed",
        fontsize=10,
    )
    return _save_figure(fig, output_png)


def phantom_preview(
    output_png: Path,
    kind: str = "cardiac",
    seed: int = 0,
    image_size: int = 128,
    num_slices: int = 8,
    cases: int = 3,
) -> Path:
    """Draw slices of the first `cases` cases of phantom `kind` with their clean contours (a
    CT phantom in the default liver window). Writes `output_png` and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfcleanse_jax.data.phantom import get_phantom

    phantom = get_phantom(kind)
    shown = sorted({round(i * (num_slices - 1) / 3) for i in range(4)})
    fig, axes = plt.subplots(cases, len(shown), figsize=(2.6 * len(shown), 2.6 * cases))
    axes = np.atleast_2d(axes)
    window = (-200.0, 250.0) if phantom.modality == "CT" else (None, None)
    for row in range(cases):
        case = phantom.make_case(seed, row, image_size, num_slices)
        for ax, z in zip(axes[row], shown, strict=True):
            ax.imshow(case.image[..., z], cmap="gray", vmin=window[0], vmax=window[1])
            for i, value in enumerate(sorted(phantom.labels)[1:]):
                mask = case.label[..., z] == value
                if mask.any():
                    colour = _COLOURS[i % len(_COLOURS)]
                    ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.0)
            ax.set_title(f"{case.name}, slice {z}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    names = ", ".join(
        f"{name} {_COLOURS[i % len(_COLOURS)].removeprefix('tab:')}"
        for i, (_, name) in enumerate(sorted(phantom.labels.items())[1:])
    )
    fig.suptitle(f"{kind} phantom (seed {seed}, {image_size} px): {names}", fontsize=10)
    return _save_figure(fig, output_png)


def _save_figure(fig, output_png: Path) -> Path:
    """Write a finished figure as a PNG (creating its folder), close it, return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_png, dpi=100)
    plt.close(fig)
    return output_png
