"""Bad input on the command line: one line naming the file and the problem, exit code 1, no
traceback (unless --debug), and nothing half-written in the workdir, cache or output folder."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from selfcleanse_jax import cli
from selfcleanse_jax.data import phantom
from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.msd import write_msd

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "msd.py")
AFFINE = np.diag([1.5, 0.9, 3.0, 1.0])


def _dataset(root: Path) -> Path:
    cases = [
        Case(c.name, c.image, c.label, (1.5, 0.9, 3.0), AFFINE)
        for c in phantom.make_cases(3, seed=0, image_size=16, num_slices=2)
    ]
    return write_msd(root, cases, [], phantom.LABELS)


def _save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> None:
    nib.save(nib.Nifti1Image(array, affine), path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


IMAGE = "imagesTr/phantom_001.nii.gz"
LABEL = "labelsTr/phantom_001.nii.gz"
SHAPE = (16, 16, 2)

# (name, how the dataset is broken, the file the message names, what it says)
TRAIN_CASES = [
    ("unreadable", lambda r: (r / IMAGE).write_bytes(b"not a NIfTI"), IMAGE, "cannot read"),
    ("truncated", lambda r: _truncate(r / IMAGE), IMAGE, "truncated"),
    (
        "shape mismatch",
        lambda r: _save(np.zeros((16, 16, 3), np.uint8), r / LABEL),
        LABEL,
        "differs from image shape",
    ),
    (
        "affine mismatch",
        lambda r: _save(np.zeros(SHAPE, np.uint8), r / LABEL, np.diag([1.5, 0.9, 2.0, 1.0])),
        LABEL,
        "affine differs",
    ),
    (
        "non-integer labels",
        lambda r: _save(np.full(SHAPE, 0.5, np.float32), r / LABEL),
        LABEL,
        "must be integers",
    ),
    (
        "label out of range",
        lambda r: _save(np.full(SHAPE, 7, np.uint8), r / LABEL),
        LABEL,
        "exceeds the 4 classes",
    ),
    (
        "NaN intensities",
        lambda r: _save(np.full(SHAPE, np.nan, np.float32), r / IMAGE),
        IMAGE,
        "NaN or infinite",
    ),
    (
        "4-D image",
        lambda r: _save(np.zeros((*SHAPE, 2), np.float32), r / IMAGE),
        IMAGE,
        "4-D image with 2 channels",
    ),
    ("file named in dataset.json missing", lambda r: (r / IMAGE).unlink(), IMAGE, "not found"),
]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("selfcleanse: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("breakage", "culprit", "problem"),
    [case[1:] for case in TRAIN_CASES],
    ids=[case[0] for case in TRAIN_CASES],
)
def test_train_on_a_bad_dataset(tmp_path, capsys, breakage, culprit, problem):
    root = _dataset(tmp_path / "data")
    breakage(root)
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["train", "--config", CONFIG, "--workdir", str(workdir)]
    argv += [f"--config.data.root={root}", f"--config.data.cache_dir={cache}"]
    assert cli.main(argv) == 1
    line = _one_line_error(capsys)
    assert str(root / culprit) in line and problem in line, line
    assert not workdir.exists()
    assert not cache.exists() or not list(cache.iterdir())


def test_train_on_an_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "run")]
    assert cli.main([*argv, f"--config.data.root={tmp_path / 'empty'}"]) == 1
    line = _one_line_error(capsys)
    assert f"{tmp_path / 'empty'}: empty folder" in line
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    argv = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "run"), "--debug"]
    with pytest.raises(ValueError, match="empty folder"):
        cli.main([*argv, f"--config.data.root={tmp_path / 'empty'}"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run on a tiny phantom, to predict with."""
    workdir = tmp_path_factory.mktemp("run")
    argv = ["train", "--config", str(Path(CONFIG).with_name("phantom.py")), "--workdir"]
    argv += [str(workdir), "--config.data.image_size=16", "--config.model.depth=1"]
    argv += ["--config.model.base_width=4", "--config.data.phantom_train_cases=2"]
    argv += ["--config.data.phantom_test_cases=1", "--config.data.phantom_slices=2"]
    argv += ["--config.train.epochs=1", "--config.train.batch_size=4", "--config.parallel=none"]
    assert cli.main([*argv, "--config.progress=False"]) == 0
    return workdir


PREDICT_CASES = [
    ("truncated", lambda p: (_save(np.ones(SHAPE, np.float32), p), _truncate(p)), "truncated"),
    ("NaN", lambda p: _save(np.full(SHAPE, np.inf, np.float32), p), "NaN or infinite"),
    ("4-D", lambda p: _save(np.ones((*SHAPE, 3), np.float32), p), "4-D image with 3 channels"),
    ("not gzip", lambda p: p.write_bytes(gzip.compress(b"x" * 400)), "cannot read"),
]


@pytest.mark.parametrize(
    ("breakage", "problem"), [c[1:] for c in PREDICT_CASES], ids=[c[0] for c in PREDICT_CASES]
)
def test_predict_on_a_bad_volume_writes_nothing(trained, tmp_path, capsys, breakage, problem):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _save(np.ones(SHAPE, np.float32), inputs / "a_good.nii.gz")  # segmented before the bad one
    breakage(inputs / "b_bad.nii.gz")
    out = tmp_path / "out"
    argv = ["predict", "--workdir", str(trained), "--input", str(inputs), "--output", str(out)]
    assert cli.main(argv) == 1
    line = _one_line_error(capsys)
    assert str(inputs / "b_bad.nii.gz") in line and problem in line, line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no staging folder left behind


def test_predict_on_an_empty_folder(trained, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    argv = ["predict", "--workdir", str(trained), "--input", str(tmp_path / "in")]
    assert cli.main([*argv, "--output", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'in'}: no .nii or .nii.gz files found" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()
