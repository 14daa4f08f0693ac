"""corrupt_dataset (a corrupted copy of an MSD dataset) and the noise gallery."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from selfcleanse_jax.data.msd import read_msd
from selfcleanse_jax.data.phantom import write_phantom_dataset
from selfcleanse_jax.noise_tools import corrupt_dataset, gallery


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "phantom"
    return write_phantom_dataset(root, num_train=2, num_test=1, seed=0, image_size=32, num_slices=3)


def _bytes(path):
    return path.read_bytes()


def test_corrupt_dataset_round_trip(dataset, tmp_path):
    out = corrupt_dataset(dataset, tmp_path / "noisy", "boundary", 0.5, 3, {"radius": (1, 2)})
    assert out == tmp_path / "noisy"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    clean_cases, _ = read_msd(dataset, "train")
    noisy_cases, _ = read_msd(out, "train")
    for sub in ("imagesTr", "imagesTs", "labelsTs"):
        for path in (dataset / sub).iterdir():
            assert _bytes(out / sub / path.name) == _bytes(path)
    assert _bytes(out / "dataset.json") == _bytes(dataset / "dataset.json")
    card = json.loads((out / "noise_card.json").read_text())
    assert card["kind"] == "boundary" and card["params"]["radius"] == [1, 2]
    differing = 0
    sample_id = 0
    for clean, noisy in zip(clean_cases, noisy_cases, strict=True):
        kept = np.asarray(nib.load(out / "labelsTr_clean" / f"{clean.name}.nii.gz").dataobj)
        np.testing.assert_array_equal(kept, clean.label)  # clean labels preserved
        np.testing.assert_array_equal(noisy.image, clean.image)
        for z in range(clean.label.shape[-1]):
            rec = card["records"][sample_id]
            assert (rec["case"], rec["z"], rec["id"]) == (clean.name, z, sample_id)
            differs = bool(np.any(noisy.label[..., z] != clean.label[..., z]))
            assert rec["noisy"] == differs
            assert rec["pixels_changed"] == np.sum(noisy.label[..., z] != clean.label[..., z])
            differing += differs
            sample_id += 1
    assert card["summary"]["num_noisy"] == differing > 0
    assert card["summary"]["num_samples"] == sample_id == 6


def test_corrupt_dataset_is_reproducible_and_refuses_to_overwrite(dataset, tmp_path):
    a = corrupt_dataset(dataset, tmp_path / "a", "markov-shrink", 1.0, 0, None)
    b = corrupt_dataset(dataset, tmp_path / "b", "markov-shrink", 1.0, 0, None)
    for path in (a / "labelsTr").iterdir():
        x = np.asarray(nib.load(path).dataobj)
        y = np.asarray(nib.load(b / "labelsTr" / path.name).dataobj)
        np.testing.assert_array_equal(x, y)
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    with pytest.raises(ValueError, match="not empty"):
        corrupt_dataset(dataset, a, "boundary", 0.5, 0, None)
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == before
    (tmp_path / "empty").mkdir()
    corrupt_dataset(dataset, tmp_path / "empty", "none", 0.0, 0, None)  # an empty dir is fine
    with pytest.raises(ValueError, match="no parameter"):
        corrupt_dataset(dataset, tmp_path / "c", "boundary", 0.5, 0, {"nope": 1})
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _as_nnunet_v2_with_nii(dataset, root):
    """A copy of `dataset` in nnU-Net v2's dialect: `.nii` files and no file lists."""
    description = json.loads((dataset / "dataset.json").read_text())
    for path in dataset.rglob("*.nii.gz"):
        target = root / path.relative_to(dataset).with_suffix("")  # x.nii.gz -> x.nii
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.load(path), target)
    labels = {name: int(value) for value, name in description["labels"].items()}
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "MRI"}, "labels": labels, "file_ending": ".nii"})
    )
    return root


def _with_listed_label_names(dataset, root):
    """A copy of `dataset` whose dataset.json lists label files named `<case>_seg.nii.gz`."""
    shutil.copytree(dataset, root)
    description = json.loads((root / "dataset.json").read_text())
    for entry in description["training"]:
        renamed = entry["label"].replace(".nii.gz", "_seg.nii.gz")
        (root / entry["label"]).rename(root / renamed)
        entry["label"] = renamed
    (root / "dataset.json").write_text(json.dumps(description))
    return root


@pytest.mark.parametrize("variant", [_as_nnunet_v2_with_nii, _with_listed_label_names])
def test_corrupt_dataset_finds_the_label_files_dataset_json_names(dataset, tmp_path, variant):
    source = variant(dataset, tmp_path / "source")
    out = corrupt_dataset(source, tmp_path / "noisy", "boundary", 1.0, 0, {"radius": (1, 2)})
    clean_cases, _ = read_msd(source, "train")
    noisy_cases, _ = read_msd(out, "train")
    assert sorted(p.name for p in (out / "labelsTr_clean").iterdir()) == sorted(
        p.name for p in (source / "labelsTr").iterdir()
    )
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(
        p.name for p in (source / "labelsTr").iterdir()
    )
    card = json.loads((out / "noise_card.json").read_text())
    changed = sum(np.sum(n.label != c.label) for n, c in zip(noisy_cases, clean_cases, strict=True))
    assert changed == sum(r["pixels_changed"] for r in card["records"]) > 0


def test_gallery_writes_a_png(tmp_path):
    path = gallery(tmp_path / "g.png", seed=1, image_size=48, kinds=("boundary", "mixed"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
