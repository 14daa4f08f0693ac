"""MSD layout: a written dataset reads back identically; bad files give clear errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from case_checks import assert_same_case

from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.msd import msd_info, read_msd, write_msd

LABELS = {0: "background", 1: "left", 2: "right"}


def _case(name: str, seed: int, spacing=(0.8, 1.2, 5.0), with_label: bool = True) -> Case:
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, 3] = [-10.0, 4.0, 2.5]
    affine[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]  # rotated in-plane, to check orientation survives
    return Case(
        name=name,
        image=rng.normal(size=(6, 5, 3)).astype(np.float32),
        label=rng.integers(0, 3, size=(6, 5, 3)).astype(np.uint8) if with_label else None,
        spacing=spacing,
        affine=affine,
    )


@pytest.fixture()
def dataset(tmp_path):
    train = [_case("a_001", 0), _case("b_002", 1, spacing=(1.5, 1.5, 3.0))]
    test = [_case("c_003", 2), _case("d_004", 3, with_label=False)]
    root = write_msd(tmp_path / "ds", train, test, LABELS, modality="MRI", name="toy")
    return root, train, test


def test_roundtrip(dataset):
    root, train, test = dataset
    read_train, description = read_msd(root, "train")
    read_test, _ = read_msd(root, "test")
    for original, read in zip(train + test, read_train + read_test, strict=True):
        assert read.name == original.name
        assert_same_case(read, original)


def test_dataset_json_decathlon_dialect(dataset):
    root, _, _ = dataset
    description = json.loads((root / "dataset.json").read_text())
    assert description["labels"] == {"0": "background", "1": "left", "2": "right"}
    assert description["modality"] == {"0": "MRI"}
    assert description["numTraining"] == 2 and description["numTest"] == 2
    assert description["training"][0] == {
        "image": "./imagesTr/a_001.nii.gz",
        "label": "./labelsTr/a_001.nii.gz",
    }
    assert description["test"] == ["./imagesTs/c_003.nii.gz", "./imagesTs/d_004.nii.gz"]
    assert nib.load(root / "labelsTr" / "a_001.nii.gz").get_data_dtype() == np.uint8
    assert nib.load(root / "imagesTr" / "a_001.nii.gz").get_data_dtype() == np.float32
    assert not list(root.parent.glob(".ds.*")), "staging directory left behind"


def test_reads_nnunet_channel_suffix_without_listing(dataset):
    root, train, _ = dataset
    for path in (root / "imagesTr").iterdir():
        path.rename(path.with_name(path.name.replace(".nii.gz", "_0000.nii.gz")))
    labels = {str(k): v for k, v in LABELS.items()}
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    cases, _ = read_msd(root, "train")
    assert [c.name for c in cases] == ["a_001", "b_002"]
    np.testing.assert_array_equal(cases[1].label, train[1].label)


def test_missing_label_names_the_file(dataset):
    root, _, _ = dataset
    (root / "labelsTr" / "b_002.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"labelsTr/b_002\.nii\.gz"):
        read_msd(root, "train")


def test_missing_image_names_the_file(dataset):
    root, _, _ = dataset
    (root / "imagesTr" / "a_001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"imagesTr/a_001\.nii\.gz"):
        read_msd(root, "train")


def test_shape_mismatch_names_the_file(dataset):
    root, _, _ = dataset
    path = root / "labelsTr" / "a_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 2), np.uint8), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"a_001\.nii\.gz: label shape"):
        read_msd(root, "train")


def test_non_integer_label_is_rejected(dataset):
    root, _, _ = dataset
    path = root / "labelsTr" / "a_001.nii.gz"
    affine = nib.load(root / "imagesTr" / "a_001.nii.gz").affine
    nib.save(nib.Nifti1Image(np.full((6, 5, 3), 0.5, np.float32), affine), path)
    with pytest.raises(ValueError, match="integers"):
        read_msd(root, "train")


def test_missing_dataset_json(tmp_path):
    with pytest.raises(ValueError, match="dataset.json: file not found"):
        read_msd(tmp_path, "train")


def test_refuses_to_overwrite_unless_asked(dataset):
    root, train, _ = dataset
    with pytest.raises(FileExistsError):
        write_msd(root, train[:1], [], LABELS)
    write_msd(root, train[:1], [], LABELS, overwrite=True)
    cases, description = read_msd(root, "train")
    assert [c.name for c in cases] == ["a_001"] and description["numTest"] == 0


def _to_v2(root, ending=".nii.gz"):
    """Rewrite a written Decathlon dataset in the nnU-Net v2 dialect: `case_0000<ending>`
    images, no file lists, name -> value labels and channel_names."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        for path in (root / sub).iterdir():
            stem = path.name[: -len(".nii.gz")]
            suffix = "_0000" if sub.startswith("images") else ""
            image = nib.load(path)
            nib.save(
                nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header),
                path.with_name(f"{stem}{suffix}{ending}"),
            )
            if ending != ".nii.gz" or suffix:
                path.unlink()
    description = {
        "channel_names": {"0": "MRI"},
        "labels": {v: k for k, v in LABELS.items()},
        "numTraining": 2,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(description))


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_reads_nnunet_v2_dialect(dataset, ending):
    root, train, test = dataset
    decathlon_names = msd_info(json.loads((root / "dataset.json").read_text()))
    _to_v2(root, ending)
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        f"a_001_0000{ending}",
        f"b_002_0000{ending}",
    ]
    cases, description = read_msd(root, "train")
    test_cases, _ = read_msd(root, "test")
    assert [c.name for c in cases + test_cases] == ["a_001", "b_002", "c_003", "d_004"]
    for original, read in zip(train + test, cases + test_cases, strict=True):
        np.testing.assert_array_equal(read.image, original.image)
        if original.label is None:
            assert read.label is None
        else:
            np.testing.assert_array_equal(read.label, original.label)
        np.testing.assert_allclose(read.spacing, original.spacing, rtol=1e-6)
    assert msd_info(description) == decathlon_names == (["background", "left", "right"], "mri")


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        ({"modality": {"0": "CT"}}, "ct"),
        ({"channel_names": {"0": "ct"}}, "ct"),
        ({"modality": {"0": "MRI"}}, "mri"),
        ({"channel_names": {"0": "T2"}}, "mri"),
        ({}, "mri"),
    ],
)
def test_modality_from_either_dialect(channels, expected):
    names, modality = msd_info({"labels": {"background": 0, "liver": 1}, **channels})
    assert names == ["background", "liver"] and modality == expected


def test_region_based_labels_are_rejected(dataset):
    root, _, _ = dataset
    _to_v2(root)
    description = json.loads((root / "dataset.json").read_text())
    description["labels"]["whole"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match=r"dataset\.json: region-based label 'whole'"):
        read_msd(root, "train")


def test_second_channel_file_is_rejected(dataset):
    root, _, _ = dataset
    _to_v2(root)
    first = root / "imagesTr" / "a_001_0000.nii.gz"
    (root / "imagesTr" / "a_001_0001.nii.gz").write_bytes(first.read_bytes())
    with pytest.raises(ValueError, match=r"a_001_0001\.nii\.gz: multi-channel"):
        read_msd(root, "train")
