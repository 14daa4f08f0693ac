"""Prediction on NIfTI files and evaluation of a run, with one tiny model trained once."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from selfcleanse_jax import train
from selfcleanse_jax.checkpoint import Checkpointer
from selfcleanse_jax.data.loading import load_dataset
from selfcleanse_jax.data.phantom import write_phantom_dataset
from selfcleanse_jax.evaluate import evaluate
from selfcleanse_jax.inference import load_trained
from selfcleanse_jax.models.unet import MODEL_FILE, UNetConfig
from selfcleanse_jax.predict import output_name, predict
from tiny import tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    config = tiny_config(**{"train.epochs": 1, "parallel": "none", "data.phantom_train_cases": 2})
    train.run(config, path)
    return path


def _volume(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 50 + 200).astype(np.float32)


def test_predict_keeps_shape_affine_and_writes_labels(workdir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    ras = np.diag([1.5, 0.8, 3.0, 1.0])
    ras[:3, 3] = [-40.0, 12.5, 7.0]
    lps = np.diag([-0.9, -0.9, 2.5, 1.0])
    lps[:3, 3] = [100.0, 80.0, -30.0]
    cases = {"a_0000.nii.gz": ((40, 28, 3), ras), "b.nii": ((24, 36, 2), lps)}
    for name, (shape, affine) in cases.items():
        nib.save(nib.Nifti1Image(_volume(shape, len(name)), affine), inputs / name)

    written = predict(workdir, inputs, tmp_path / "out", flip_tta=True, progress=False)
    assert sorted(p.name for p in written) == ["a.nii.gz", "b.nii"]
    for name, (shape, affine) in cases.items():
        out = nib.load(tmp_path / "out" / output_name(inputs / name))
        data = np.asanyarray(out.dataobj)
        assert data.shape == shape
        assert data.dtype == np.uint8
        assert data.max() < 4  # the phantom's 4 classes
        np.testing.assert_allclose(out.affine, affine, atol=1e-5)
        np.testing.assert_allclose(out.get_sform(), affine, atol=1e-5)
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left behind

    single = predict(workdir, inputs / "b.nii", tmp_path / "out2", progress=False)
    assert [p.name for p in single] == ["b.nii"]


def test_predict_on_phantom_files_segments_as_training_prepared_them(workdir, tmp_path):
    """The run's phantom test case, written as NIfTI, gets exactly the labels that the model
    gives the training run's own test slices."""
    root = write_phantom_dataset(
        tmp_path / "phantom", num_train=2, num_test=1, seed=0, image_size=32, num_slices=4
    )
    [written] = predict(workdir, root / "imagesTs", tmp_path / "out", progress=False)
    data = np.asanyarray(nib.load(written).dataobj)
    assert data.shape == (32, 32, 4) and data.dtype == np.uint8
    model = load_trained(workdir)
    table = load_dataset(model.config).test
    np.testing.assert_array_equal(np.moveaxis(data, -1, 0), model.labels(table.images))


def _copy_run(workdir, target):
    """The run's records in `target`, its checkpoint rewritten with only the step, weights and
    batch statistics of its state (no optimizer state, no teacher)."""
    target.mkdir()
    for name in ("config.json", MODEL_FILE):
        (target / name).write_text((workdir / name).read_text())
    source = Checkpointer(workdir, read_only=True)
    step = source.latest_step()
    state = source.restore_state(step)
    meta = source.read_meta(step)
    source.close()
    assert "opt_state" in state  # the training run's checkpoint has one
    copy = Checkpointer(target)
    bank = {"targets": np.zeros(1)}  # orbax writes no empty item
    copy.save(step, {k: state[k] for k in ("step", "params", "batch_stats")}, bank, meta)
    copy.close()


def test_predict_needs_no_optimizer_state(workdir, tmp_path):
    """A checkpoint holding the weights alone is enough, and gives the same labels."""
    _copy_run(workdir, tmp_path / "weights_only")
    root = write_phantom_dataset(
        tmp_path / "phantom", num_train=2, num_test=1, seed=0, image_size=32, num_slices=4
    )
    [full] = predict(workdir, root / "imagesTs", tmp_path / "full", progress=False)
    [alone] = predict(
        tmp_path / "weights_only", root / "imagesTs", tmp_path / "alone", progress=False
    )
    np.testing.assert_array_equal(nib.load(alone).get_fdata(), nib.load(full).get_fdata())


def test_model_record_gives_the_architecture_and_older_runs_still_load(workdir, tmp_path):
    model = load_trained(workdir)
    saved = json.loads((workdir / MODEL_FILE).read_text())
    assert UNetConfig(**saved) == model.model_config
    assert (saved["in_channels"], saved["num_classes"]) == (1, 4)
    older = tmp_path / "older"
    _copy_run(workdir, older)
    (older / MODEL_FILE).unlink()  # a run from before the architecture was recorded
    images = load_dataset(model.config).test.images
    np.testing.assert_array_equal(load_trained(older).labels(images), model.labels(images))


def test_inference_does_not_import_the_training_loop():
    code = (
        "import sys, selfcleanse_jax.predict, selfcleanse_jax.evaluate;"
        "print(sorted(m for m in sys.modules if m in "
        "('selfcleanse_jax.train', 'selfcleanse_jax.steps', 'selfcleanse_jax.cleansing')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_predict_rejects_a_file_that_is_not_nifti(workdir, tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="x.nii.gz"):
        predict(workdir, bad, tmp_path / "out", progress=False)


def test_predict_rejects_a_multichannel_volume(workdir, tmp_path):
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(_volume((8, 8, 2, 2), 0), np.eye(4)), path)
    with pytest.raises(ValueError, match="m.nii.gz"):
        predict(workdir, path, tmp_path / "out", progress=False)


def test_evaluate_writes_metrics_and_per_case_rows(workdir):
    result = evaluate(workdir)
    saved = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert saved == result
    names = ["right ventricle", "myocardium", "left ventricle"]
    assert list(result["per_class"]) == names
    dice = [result["per_class"][n]["dice"]["mean"] for n in names]
    assert result["mean_dice"] == pytest.approx(np.mean(dice))
    # Same volume Dice as the training loop's own test evaluation.
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert dice == pytest.approx(list(last["test_dice_per_class"].values()), abs=1e-6)
    with (workdir / "eval" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["num_cases"] * len(names)
    measures = ["dice", "iou", "hd95", "assd", "hd95_pooled", "hd"]
    assert list(rows[0]) == ["case", "class", *measures]
    for name in names:
        assert list(result["per_class"][name]) == [*measures, "missing_distances"]


def test_evaluate_errors_name_the_path(tmp_path, workdir):
    with pytest.raises(ValueError, match="config.json"):
        evaluate(tmp_path)
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(ValueError, match="checkpoints"):
        evaluate(tmp_path)
    with pytest.raises(ValueError, match="no validation split"):
        evaluate(workdir, split="val")
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate(workdir, split="train")
