"""Each kind of bad input is a one-line ValueError naming the file and the problem."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from selfcleanse_jax.data.acdc import read_acdc, write_acdc
from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.layouts import detect_layout, read_layout
from selfcleanse_jax.data.lits import read_lits, write_lits
from selfcleanse_jax.data.msd import read_msd, write_msd

SHAPE = (12, 10, 3)


def _case(name: str = "a", max_label: int = 2) -> Case:
    rng = np.random.default_rng(len(name))
    affine = np.diag([0.8, 1.2, 5.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 2.5]
    return Case(
        name=name,
        image=rng.normal(size=SHAPE).astype(np.float32),
        label=rng.integers(0, max_label + 1, size=SHAPE).astype(np.uint8),
        spacing=(0.8, 1.2, 5.0),
        affine=affine,
    )


@pytest.fixture()
def msd_root(tmp_path):
    return write_msd(tmp_path / "ds", [_case("a"), _case("bb")], [], {0: "bg", 1: "x", 2: "y"})


def _raises(call, file_name: str, keyword: str) -> str:
    """Run `call`; it must raise a one-line ValueError starting with a path ending in
    `file_name` and containing `keyword`."""
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"[^:]*{re.escape(file_name)}: ", message), message
    assert keyword in message, message
    return message


def _save_like(path, data, like):
    """Overwrite `path` with `data` in the header geometry of the NIfTI file `like`."""
    nib.save(nib.Nifti1Image(data, nib.load(like).affine), path)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_nifti(tmp_path, ending):
    write_lits(tmp_path, {1: _case()}, ending=ending)
    path = tmp_path / f"volume-1{ending}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    _raises(lambda: read_lits(tmp_path), f"volume-1{ending}", "truncated")


def test_image_and_label_shapes_differ(msd_root):
    label = msd_root / "labelsTr" / "a.nii.gz"
    _save_like(label, np.zeros((12, 10, 2), np.uint8), label)
    _raises(lambda: read_msd(msd_root), "labelsTr/a.nii.gz", "shape")


def test_image_and_label_affines_differ(msd_root):
    label = msd_root / "labelsTr" / "a.nii.gz"
    data = np.asarray(nib.load(label).dataobj)
    shifted = nib.load(label).affine.copy()
    shifted[0, 3] += 0.01
    nib.save(nib.Nifti1Image(data, shifted), label)
    _raises(lambda: read_msd(msd_root), "labelsTr/a.nii.gz", "affine")


def test_tiny_affine_difference_is_accepted(msd_root):
    label = msd_root / "labelsTr" / "a.nii.gz"
    data = np.asarray(nib.load(label).dataobj)
    shifted = nib.load(label).affine.copy()
    shifted[0, 3] += 1e-4
    nib.save(nib.Nifti1Image(data, shifted), label)
    assert len(read_msd(msd_root)[0]) == 2


def test_label_values_not_integers(msd_root):
    label = msd_root / "labelsTr" / "bb.nii.gz"
    _save_like(label, np.full(SHAPE, 1.5, np.float32), label)
    _raises(lambda: read_msd(msd_root), "labelsTr/bb.nii.gz", "integers")


def test_label_exceeds_msd_classes(msd_root):
    label = msd_root / "labelsTr" / "a.nii.gz"
    _save_like(label, np.full(SHAPE, 3, np.uint8), label)
    _raises(lambda: read_msd(msd_root), "labelsTr/a.nii.gz", "exceeds the 3 classes")


def test_label_exceeds_acdc_classes(tmp_path):
    write_acdc(tmp_path, {"patient001": (_case(max_label=3), _case("es", max_label=4))})
    message = _raises(
        lambda: read_acdc(tmp_path), "patient001_frame12_gt.nii.gz", "exceeds the 4 classes"
    )
    assert "label value 4" in message


def test_label_exceeds_lits_classes(tmp_path):
    write_lits(tmp_path, {7: _case(max_label=3)})
    _raises(lambda: read_lits(tmp_path), "segmentation-7.nii", "exceeds the 3 classes")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_image_not_finite(msd_root, bad):
    image = msd_root / "imagesTr" / "bb.nii.gz"
    data = np.asarray(nib.load(image).dataobj).copy()
    data[3, 4, 1] = bad
    _save_like(image, data, image)
    _raises(lambda: read_msd(msd_root), "imagesTr/bb.nii.gz", "NaN or infinite")


def test_multichannel_4d_image(msd_root):
    image = msd_root / "imagesTr" / "a.nii.gz"
    _save_like(image, np.zeros((*SHAPE, 2), np.float32), image)
    _raises(lambda: read_msd(msd_root), "imagesTr/a.nii.gz", "2 channels")


def test_empty_folder(tmp_path):
    _raises(lambda: detect_layout(tmp_path), tmp_path.name, "empty folder")
    _raises(lambda: read_layout(tmp_path), tmp_path.name, "empty folder")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    _raises(lambda: read_msd(tmp_path), "imagesTr", "empty folder")


def test_dataset_json_names_missing_files(msd_root):
    (msd_root / "imagesTr" / "bb.nii.gz").unlink()
    _raises(lambda: read_msd(msd_root), "imagesTr/bb.nii.gz", "named in dataset.json")
    description = json.loads((msd_root / "dataset.json").read_text())
    description["training"][1]["image"] = "./imagesTr/a.nii.gz"
    description["training"][1]["label"] = "./labelsTr/gone.nii.gz"
    (msd_root / "dataset.json").write_text(json.dumps(description))
    _raises(lambda: read_msd(msd_root), "labelsTr/gone.nii.gz", "not found")


def test_acdc_missing_info_cfg(tmp_path):
    write_acdc(tmp_path, {"patient001": (_case(), _case("es"))})
    (tmp_path / "training" / "patient001" / "Info.cfg").unlink()
    _raises(lambda: read_acdc(tmp_path), "patient001/Info.cfg", "not found")


def test_acdc_missing_frame_named_by_info_cfg(tmp_path):
    write_acdc(tmp_path, {"patient001": (_case(), _case("es"))}, frames=(1, 12))
    info = tmp_path / "training" / "patient001" / "Info.cfg"
    info.write_text(info.read_text().replace("ES: 12", "ES: 13"))
    message = _raises(lambda: read_acdc(tmp_path), "patient001_frame13.nii.gz", "not found")
    assert "ES: 13" in message


def test_lits_volume_without_segmentation(tmp_path):
    write_lits(tmp_path, {4: _case()}, folder="Training Batch 1")
    (tmp_path / "Training Batch 1" / "segmentation-4.nii").unlink()
    _raises(lambda: read_lits(tmp_path), "volume-4.nii", "no matching segmentation-4")
