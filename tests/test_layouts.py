"""ACDC and LiTS layouts read back what was written; layouts are detected; all three agree."""

from __future__ import annotations

import numpy as np
import pytest
from case_checks import assert_same_case

from selfcleanse_jax.data.acdc import read_acdc, write_acdc
from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.layouts import (
    LAYOUTS,
    DatasetInfo,
    detect_layout,
    layout_files,
    read_layout,
)
from selfcleanse_jax.data.lits import read_lits, write_lits
from selfcleanse_jax.data.msd import write_msd

SHAPE = (12, 10, 3)
SPACING = (1.5625, 1.25, 10.0)


def make_case(seed: int, max_label: int = 3, with_label: bool = True, name: str = "c") -> Case:
    """A small case with a rotated, shifted affine and anisotropic voxels."""
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    affine[:3, 3] = [30.0 + seed, -12.0, 4.5]
    label = rng.integers(0, max_label + 1, size=SHAPE).astype(np.uint8)
    return Case(
        name=name,
        image=rng.normal(size=SHAPE).astype(np.float32),
        label=label if with_label else None,
        spacing=SPACING,
        affine=affine,
    )


@pytest.fixture()
def acdc_root(tmp_path):
    train = {f"patient{n:03d}": (make_case(2 * n), make_case(2 * n + 1)) for n in (2, 1)}
    test = {"patient101": (make_case(50), make_case(51, with_label=False))}
    root = tmp_path / "ACDC"
    write_acdc(root, train, frames=(1, 12))
    write_acdc(root, test, split_dir="testing", frames=(3, 9))
    return root, train, test


def test_acdc_reads_ed_es_frames_named_by_info_cfg(acdc_root):
    root, train, test = acdc_root
    cases = read_acdc(root, "train")
    assert [c.name for c in cases] == [
        "patient001_ED",
        "patient001_ES",
        "patient002_ED",
        "patient002_ES",
    ]
    for read, original in zip(cases, [*train["patient001"], *train["patient002"]], strict=True):
        assert_same_case(read, original)
    test_cases = read_acdc(root, "test")
    assert [c.name for c in test_cases] == ["patient101_ED", "patient101_ES"]
    for read, original in zip(test_cases, test["patient101"], strict=True):
        assert_same_case(read, original)


def test_acdc_info_cfg_decides_the_frames(acdc_root):
    root, train, _ = acdc_root
    info = root / "training" / "patient001" / "Info.cfg"
    info.write_text(info.read_text().replace("ED: 1", "ED: 12").replace("ES: 12", "ES: 1"))
    cases = read_acdc(root, "train")
    assert_same_case(cases[0], train["patient001"][1])
    assert_same_case(cases[1], train["patient001"][0])


def test_acdc_patient_folders_directly_under_root_are_training(tmp_path):
    patients = {"patient007": (make_case(7), make_case(8))}
    root = write_acdc(tmp_path / "flat", patients, split_dir="", frames=(4, 10))
    cases, info = read_layout(root, "acdc", "train")
    assert [c.name for c in cases] == ["patient007_ED", "patient007_ES"]
    assert_same_case(cases[1], patients["patient007"][1])
    assert info == DatasetInfo(["background", "RV", "myocardium", "LV"], "mri", "acdc")
    assert read_layout(root, "acdc", "test")[0] == []
    assert detect_layout(root) == "acdc"


@pytest.fixture()
def lits_root(tmp_path):
    root = tmp_path / "LiTS"
    first = {n: make_case(n, max_label=2) for n in (10, 2)}
    second = {1: make_case(1, max_label=2)}
    write_lits(root, first, folder="Training Batch 1")
    write_lits(root, second, folder="Training Batch 2", ending=".nii.gz")
    write_lits(root, {3: make_case(3, with_label=False)}, folder="Test", test=True)
    return root, {**first, **second}


def test_lits_reads_recursively_sorted_numerically(lits_root):
    root, originals = lits_root
    cases = read_lits(root, "train")
    assert [c.name for c in cases] == ["volume-1", "volume-2", "volume-10"]
    for read, number in zip(cases, (1, 2, 10), strict=True):
        assert_same_case(read, originals[number])
    test_cases, info = read_layout(root, "lits", "test")
    assert [c.name for c in test_cases] == ["test-volume-3"] and test_cases[0].label is None
    assert info == DatasetInfo(["background", "liver", "tumour"], "ct", "lits")


def test_lits_tumour_only_remaps_labels(lits_root):
    root, originals = lits_root
    cases, info = read_layout(root, "lits", lits_classes="tumour")
    assert info.class_names == ["background", "tumour"]
    expected = (originals[1].label == 2).astype(np.uint8)
    np.testing.assert_array_equal(cases[0].label, expected)
    assert set(np.unique(cases[0].label)) == {0, 1}


def test_detect_layout_for_each(tmp_path, acdc_root, lits_root):
    msd_root = write_msd(tmp_path / "msd", [make_case(0, name="a")], [], {0: "bg", 1: "x"})
    assert detect_layout(msd_root) == "msd"
    assert detect_layout(acdc_root[0]) == "acdc"
    assert detect_layout(lits_root[0]) == "lits"
    nested = tmp_path / "acdc_test_only"
    write_acdc(nested, {"patient150": (make_case(1), make_case(2))}, split_dir="testing")
    assert detect_layout(nested) == "acdc"


def test_detect_layout_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: empty folder, no dataset found"):
        detect_layout(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"other: no dataset found \(looked for dataset\.json"):
        detect_layout(other)
    with pytest.raises(ValueError, match=r"unknown layout 'kits'; choose one of msd, acdc, lits"):
        read_layout(other, "kits")
    assert LAYOUTS == ("msd", "acdc", "lits")


def test_layout_files_lists_every_file_read(tmp_path, acdc_root, lits_root):
    root, _, _ = acdc_root
    names = [p.name for p in layout_files(root, "acdc")]
    assert "Info.cfg" in names and "patient001_frame12_gt.nii.gz" in names
    assert not any(n.endswith("_4d.nii.gz") for n in names)
    assert len(names) == 2 * 5 + 4  # training: cfg + 4 frame files each; testing: cfg + 3
    lits_files = layout_files(lits_root[0])
    assert sorted(p.name for p in lits_files) == sorted(
        ["volume-2.nii", "segmentation-2.nii", "volume-10.nii", "segmentation-10.nii"]
        + ["volume-1.nii.gz", "segmentation-1.nii.gz", "test-volume-3.nii"]
    )
    msd_root = write_msd(tmp_path / "msd", [make_case(0, name="a")], [], {0: "bg", 1: "x"})
    assert [p.name for p in layout_files(msd_root)] == [
        "dataset.json",
        "a.nii.gz",
        "a.nii.gz",
    ]


def test_class_names_agree_across_layouts(tmp_path, acdc_root):
    names = {0: "background", 1: "RV", 2: "myocardium", 3: "LV"}
    msd_root = write_msd(tmp_path / "msd", [make_case(0, name="a")], [], names)
    _, msd_info = read_layout(msd_root)
    _, acdc_info = read_layout(acdc_root[0])
    assert msd_info.class_names == acdc_info.class_names
    assert msd_info.modality == acdc_info.modality == "mri"
