"""Real-volume round trip in each layout, from the command line.

Small phantom volumes are written in the MSD, ACDC and LiTS layouts with anisotropic,
translated affines, half of them stored RAS and half LPS; one epoch of training runs on each,
then `predict` segments the dataset's own image files and every mask must come back with its
input's exact shape and affine, as uint8 that nibabel loads.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import surface_reference

from selfcleanse_jax import cli, metrics
from selfcleanse_jax.data import phantom
from selfcleanse_jax.data.acdc import CLASS_NAMES, write_acdc
from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.lits import write_lits
from selfcleanse_jax.data.msd import write_msd

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "msd.py")
SPACING = (1.25, 0.8, 4.0)
TINY = [
    "--config.data.image_size=32",
    "--config.model.depth=2",
    "--config.model.base_width=8",
    "--config.train.batch_size=4",
    "--config.train.epochs=1",
    "--config.parallel=none",
    "--config.progress=False",
]


def _case(number: int, lps: bool, name: str | None = None) -> Case:
    """Phantom case `number` cropped to 24 x 20 x 4, stored RAS, or LPS with the first two
    array axes reversed so that every voxel keeps its world position."""
    source = phantom.make_case(0, number, 24, 4)
    image, label = source.image[:, 2:22], source.label[:, 2:22]
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-20.0 + number, 35.5, -12.0]
    if lps:
        image, label = image[::-1, ::-1], label[::-1, ::-1]
        affine[:3, 3] += [SPACING[0] * (image.shape[0] - 1), SPACING[1] * (image.shape[1] - 1), 0]
        affine[:2, :2] *= -1
    return Case(
        name=name or f"case_{number:02d}",
        image=np.ascontiguousarray(image),
        label=np.ascontiguousarray(label),
        spacing=SPACING,
        affine=affine,
    )


def _liver(case: Case) -> Case:
    """LiTS classes from the phantom's: RV and myocardium as liver (1), LV as tumour (2)."""
    label = np.where(case.label == 3, 2, np.minimum(case.label, 1)).astype(np.uint8)
    return Case(case.name, case.image, label, case.spacing, case.affine)


def _train(root: Path, workdir: Path, cache: Path, *extra: str) -> dict:
    argv = ["train", "--config", CONFIG, "--workdir", str(workdir), *TINY]
    argv += [f"--config.data.root={root}", f"--config.data.cache_dir={cache}", *extra]
    assert cli.main(argv) == 0
    return json.loads((workdir / "config.json").read_text())


def _predict_and_check(workdir: Path, images: list[Path], tmp: Path) -> dict[str, np.ndarray]:
    """Predict the given image files; check each mask against its input; return the masks."""
    inputs = tmp / "inputs"
    inputs.mkdir()
    for image in images:
        shutil.copy(image, inputs / image.name)
    out = tmp / "masks"
    assert (
        cli.main(
            ["predict", "--workdir", str(workdir), "--input", str(inputs)] + ["--output", str(out)]
        )
        == 0
    )
    masks = {}
    for image in images:
        source = nib.load(image)
        mask = nib.load(out / image.name.replace("_0000", ""))
        data = np.asanyarray(mask.dataobj)
        assert data.shape == source.shape, image.name
        assert data.dtype == np.uint8
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(mask.get_sform(), source.affine, atol=1e-5)
        assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(source.affine)
        masks[image.name] = data
    return masks


def _medpy_figures(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """medpy's assd, hd95 and hd of two masks (our assd, hd95_pooled and hd), or nothing
    when medpy >= 0.5.2 is not installed (the `crosscheck` extra)."""
    try:
        import medpy
        from medpy.metric import binary
    except ImportError:
        return {}
    if tuple(int(p) for p in medpy.__version__.split(".")[:3]) < (0, 5, 2):
        return {}
    return {
        "assd": binary.assd(pred, ref, voxelspacing=SPACING),
        "hd95_pooled": binary.hd95(pred, ref, voxelspacing=SPACING),
        "hd": binary.hd(pred, ref, voxelspacing=SPACING),
    }


def test_msd_layout_round_trip_keeps_geometry_and_orientation(tmp_path):
    train = [_case(n, lps=n % 2 == 1) for n in range(4)]
    twins = [_case(7, lps=False, name="twin_ras"), _case(7, lps=True, name="twin_lps")]
    labels = {k: v for k, v in phantom.LABELS.items()}
    root = write_msd(tmp_path / "msd", train, twins, labels, modality="MRI")
    workdir = tmp_path / "run"
    config = _train(root, workdir, tmp_path / "cache")
    assert config["data"]["modality"] == "mri"

    images = sorted((root / "imagesTr").iterdir()) + sorted((root / "imagesTs").iterdir())
    masks = _predict_and_check(workdir, images, tmp_path)
    # The same anatomy stored RAS and LPS is prepared identically, so it gets the same labels.
    np.testing.assert_array_equal(masks["twin_lps.nii.gz"][::-1, ::-1], masks["twin_ras.nii.gz"])
    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    result = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert result["split"] == "test" and result["num_cases"] == 2
    # evaluate scores each test case on its own voxel grid, exactly as predict segments it.
    with (workdir / "eval" / "per_case.csv").open() as f:
        rows = {(r["case"], r["class"]): r for r in csv.DictReader(f)}
    # Its figures are those of an independent computation (tests/surface_reference.py) on the
    # mask files and the label files.
    names = [phantom.LABELS[k] for k in sorted(phantom.LABELS)]
    measured = []
    for case in ("twin_ras", "twin_lps"):
        label = np.asanyarray(nib.load(root / "labelsTs" / f"{case}.nii.gz").dataobj)
        mask = masks[f"{case}.nii.gz"]
        for c in range(1, 4):
            row = rows[(case, names[c])]
            pred, ref = mask == c, label == c
            total = pred.sum() + ref.sum()
            dice = 2 * np.sum(pred & ref) / total if total else 1.0
            assert float(row["dice"]) == pytest.approx(dice, abs=1e-12)
            if pred.any() and ref.any():
                expected = surface_reference.reference(pred, ref, SPACING)
                for k in metrics.DISTANCES:
                    assert float(row[k]) == pytest.approx(expected[k], abs=1e-6), (case, c, k)
                for k, value in _medpy_figures(pred, ref).items():
                    assert float(row[k]) == pytest.approx(value, abs=1e-6), (case, c, k)
                measured.append(expected)
            else:
                assert all(row[k] == "" for k in metrics.DISTANCES)
    assert measured, "no class is in both a mask and its label: no distance was checked"


def test_acdc_layout_round_trip_with_a_validation_fold(tmp_path):
    patients = {
        f"patient{p:03d}": (_case(2 * p, lps=p % 2 == 0), _case(2 * p + 1, lps=p % 2 == 0))
        for p in (1, 2, 3)
    }
    root = write_acdc(tmp_path / "acdc", patients)
    workdir = tmp_path / "run"
    _train(root, workdir, tmp_path / "cache", "--config.data.folds=2")
    frames = sorted(p for p in root.glob("training/*/*_frame??.nii.gz"))
    assert len(frames) == 6
    _predict_and_check(workdir, frames, tmp_path)
    assert cli.main(["evaluate", "--workdir", str(workdir), "--split", "val"]) == 0
    result = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert result["split"] == "val" and result["num_cases"] >= 1
    assert list(result["per_class"]) == CLASS_NAMES[1:]


@pytest.mark.parametrize("classes", ["liver_tumour", "tumour"])
def test_lits_layout_round_trip_resampled_to_a_spacing(tmp_path, classes):
    volumes = {n: _liver(_case(n, lps=n % 2 == 0)) for n in range(1, 5)}
    root = write_lits(tmp_path / "lits", volumes, folder="Training Batch 1")
    workdir = tmp_path / "run"
    extra = [f"--config.data.lits_classes={classes}", "--config.data.target_spacing=1.5"]
    config = _train(root, workdir, tmp_path / "cache", *extra)
    assert config["data"]["modality"] == "ct"
    images = sorted((root / "Training Batch 1").glob("volume-*.nii"))
    masks = _predict_and_check(workdir, images, tmp_path)
    top = 2 if classes == "liver_tumour" else 1
    assert all(m.max() <= top for m in masks.values())
