"""The run report on tiny trained runs: files, numbers from metrics.jsonl, noise-card grouping."""

import base64
import json
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from selfcleanse_jax import records, train
from selfcleanse_jax.data.loading import load_dataset
from selfcleanse_jax.records import read_rounds
from selfcleanse_jax.report import (
    gmm_input_quartiles,
    make_report,
    noise_truth,
    overlay_examples,
)
from tiny import tiny_config

# The same epochs everywhere, so that all runs share one compilation of the training steps.
RUN = {"train.epochs": 3, "cleanse.warmup_epochs": 1, "train.checkpoint": False}


@pytest.fixture(scope="module")
def tiny_dataset():
    return load_dataset(tiny_config())


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, tiny_dataset):
    def run(name, **overrides):
        workdir = tmp_path_factory.mktemp(name)
        config = tiny_config(**{**RUN, "noise.kind": "missing", **overrides})
        train.Trainer(config, workdir, tiny_dataset).run()
        return workdir

    return run


@pytest.fixture(scope="module")
def selfcleanse_run(train_run):
    return train_run("selfcleanse", method="selfcleanse", **{"train.checkpoint": True})


@pytest.fixture(scope="module")
def report(selfcleanse_run):
    return make_report(selfcleanse_run)


def test_a_runs_records_follow_the_schema(selfcleanse_run, tmp_path):
    """Every file the loop writes has exactly the fields `records` declares."""
    lines = records.read_metrics(selfcleanse_run)
    assert all(set(line) <= set(records.EpochRecord.__annotations__) for line in lines)
    assert {"epoch", "train_loss", "test_dice", "seconds"} <= set(lines[-1])
    rounds = [line["cleanse"] for line in lines if "cleanse" in line]
    always = set(records.CleanseRecord.__annotations__) - records.OPTIONAL_CLEANSE_FIELDS
    optional = records.OPTIONAL_CLEANSE_FIELDS
    assert rounds and all(always <= set(r) <= always | optional for r in rounds)
    summary = json.loads((selfcleanse_run / records.SUMMARY_FILE).read_text())
    assert set(summary) == set(records.Summary.__annotations__)
    every_epoch = set(records.EPOCH_ARRAYS)
    for epoch, arrays in records.read_dynamics(selfcleanse_run).items():
        expected = every_epoch | set(records.ROUND_ARRAYS) if epoch in (1, 2) else every_epoch
        assert set(arrays) == expected, epoch
    with pytest.raises(ValueError, match="schema"):
        records.write_dynamics(tmp_path, 0, {"idx": np.arange(2), "loss": np.zeros(2)})


def test_a_calibrated_run_records_its_offsets_in_every_round(train_run):
    """With both calibration options (the default), every round records the LFM's class
    offsets and every round that flags slices the LCM's; the background's offset is 0; with
    both off, no round records any. (The oracle flags make the tiny run's rounds flag.)"""
    workdir = train_run("calibrated", method="selfcleanse", **{"cleanse.lfm_oracle": True})
    rounds = [line["cleanse"] for line in records.read_metrics(workdir) if "cleanse" in line]
    assert rounds and all(set(r) <= set(records.CleanseRecord.__annotations__) for r in rounds)
    for record in rounds:
        assert len(record["lfm_class_offsets"]) == 4 and record["lfm_class_offsets"][0] == 0.0
        assert ("class_offsets" in record) == (record["flagged"] > 0)
    assert any(r["flagged"] for r in rounds)
    off = {"cleanse.calibrate": False, "cleanse.calibrate_lfm": False, "cleanse.lfm_oracle": True}
    workdir = train_run("uncalibrated", method="selfcleanse", **off)
    rounds = [line["cleanse"] for line in records.read_metrics(workdir) if "cleanse" in line]
    assert any(r["flagged"] for r in rounds)
    assert not any({"class_offsets", "lfm_class_offsets"} & set(r) for r in rounds)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_images(paths):
    for path in paths:
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path
        assert image.std() > 0, f"{path} is blank"


FIGURES = ["curves.png", "lfm.png", "memorisation.png", "losses.png", "overlays.png"]


def test_report_writes_the_plots_the_summary_and_a_page(selfcleanse_run, report):
    names = [*FIGURES, "summary.md", "index.html"]
    assert report["files"] == [str(selfcleanse_run / "report" / name) for name in names]
    _assert_images(report["files"][: len(FIGURES)])
    assert report["summary"]["skipped"] == []
    json.dumps(report["summary"])


def test_the_page_holds_the_summary_and_every_figure_embedded(selfcleanse_run, report):
    page = (selfcleanse_run / "report" / "index.html").read_text()
    for name in FIGURES:
        data = base64.b64encode((selfcleanse_run / "report" / name).read_bytes()).decode()
        assert f'alt="{name}" src="data:image/png;base64,{data}"' in page
    assert page.count("<img") == len(FIGURES)  # nothing loaded from elsewhere
    assert f"{_records(selfcleanse_run)[-1]['test_dice']:.4g}" in page


def test_the_overlays_show_noisy_slices_flagged_and_not(selfcleanse_run, report):
    card = json.loads((selfcleanse_run / "noise_card.json").read_text())
    last = read_rounds(selfcleanse_run)[2]
    chosen, flagged = overlay_examples(last, noise_truth(card))
    assert flagged == set(last["idx"][last["flagged"]].tolist())
    noisy = {r["id"] for r in card["records"] if r["noisy"]}
    assert chosen and set(chosen) <= noisy
    # one row of 2.6 inches at 100 dpi per chosen slice, flagged ones first
    assert imread(selfcleanse_run / "report" / "overlays.png").shape[0] == 260 * len(chosen)
    _assert_images([selfcleanse_run / "report" / "overlays.png"])


def test_overlay_examples_take_flagged_then_unflagged_noisy_slices():
    last = {
        "idx": np.array([7, 3, 1, 0, 5, 2, 6, 4]),
        "flagged": np.array([1, 1, 1, 0, 0, 1, 0, 1], bool),
    }
    truth = {i: i % 2 == 1 or i == 6 for i in range(8)}  # noisy: 1, 3, 5, 6, 7
    chosen, flagged = overlay_examples(last, truth, per_group=2)
    assert flagged == {7, 3, 1, 2, 4}
    assert chosen == [1, 3, 5, 6]
    assert overlay_examples(last, None, per_group=1)[0] == [1, 0]


def test_summary_numbers_are_those_of_metrics_jsonl(selfcleanse_run, report):
    records = _records(selfcleanse_run)
    rounds = [r for r in records if "cleanse" in r]
    last, summary = records[-1], report["summary"]
    assert (summary["method"], summary["noise_kind"]) == ("selfcleanse", "missing")
    assert summary["epochs"] == 3 and summary["cleansing_rounds"] == len(rounds) == 2
    assert summary["first_cleansing_epoch"] == 1
    assert summary["final_test_dice"] == last["test_dice"]
    assert summary["final_test_dice_per_class"] == last["test_dice_per_class"]
    assert summary["last_flagged"] == last["cleanse"]["flagged"]
    assert summary["detection"] == last["cleanse"]["detection"]
    assert summary["pseudo_label_dice"] == last["cleanse"]["pseudo_label_dice"]
    aucs = {r["epoch"]: r["cleanse"]["detection"]["auc"] for r in rounds}
    best = max(aucs, key=aucs.get)
    assert summary["best_detection_auc"] == {"epoch": best, "auc": aucs[best]}
    table = (selfcleanse_run / "report" / "summary.md").read_text()
    assert f"| flagged in the last round | {last['cleanse']['flagged']} |" in table
    assert f"{last['test_dice']:.4g}" in table


def test_gmm_input_groups_follow_the_noise_card_by_sample_id(selfcleanse_run):
    card = json.loads((selfcleanse_run / "noise_card.json").read_text())
    noisy_ids = {r["id"] for r in card["records"] if r["noisy"]}
    assert 0 < len(noisy_ids) < len(card["records"])
    rounds = read_rounds(selfcleanse_run)
    assert sorted(rounds) == [1, 2]
    for arrays in rounds.values():  # the model's prediction against the given label, per slice
        assert arrays["prediction_given_dice"].shape == arrays["idx"].shape
        assert (
            (arrays["prediction_given_dice"] >= 0) & (arrays["prediction_given_dice"] <= 1)
        ).all()
    expected = {"clean": [], "noisy": []}
    for epoch in (1, 2):
        arrays = np.load(selfcleanse_run / "dynamics" / f"epoch_{epoch:04d}.npz")
        noisy = np.isin(arrays["idx"], list(noisy_ids))
        expected["clean"].append(np.median(arrays["lfm_input"][~noisy]))
        expected["noisy"].append(np.median(arrays["lfm_input"][noisy]))
    quartiles = gmm_input_quartiles(rounds, noise_truth(card))
    for name in ("clean", "noisy"):
        np.testing.assert_allclose(quartiles[name][:, 1], expected[name], rtol=1e-6)
    # Slices stored in another order are still grouped by their id, not their position.
    order = np.random.default_rng(0).permutation(len(rounds[1]["idx"]))
    shuffled = {epoch: {k: v[order] for k, v in a.items()} for epoch, a in rounds.items()}
    shuffled_quartiles = gmm_input_quartiles(shuffled, noise_truth(card))
    for name in ("clean", "noisy"):
        np.testing.assert_allclose(shuffled_quartiles[name], quartiles[name])


def test_without_a_noise_card_the_losses_form_one_group(selfcleanse_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(selfcleanse_run, workdir, ignore=shutil.ignore_patterns("report"))
    (workdir / "noise_card.json").unlink()
    rounds = read_rounds(workdir)
    assert list(gmm_input_quartiles(rounds, noise_truth(None))) == ["all"]
    result = make_report(workdir, tmp_path / "out")
    assert (tmp_path / "out" / "losses.png").is_file()
    assert result["summary"]["skipped"] == ["clean/noisy split: no noise_card.json"]


def test_a_run_without_dynamics_skips_the_plots_made_from_them(train_run, tmp_path):
    workdir = train_run("no_dynamics", method="selfcleanse", **{"train.record_dynamics": False})
    assert not (workdir / "dynamics").exists()
    result = make_report(workdir, tmp_path)
    names = [path.rsplit("/", 1)[-1] for path in result["files"]]
    assert names == ["curves.png", "lfm.png", "summary.md", "index.html"]
    _assert_images(result["files"][:2])
    skipped = result["summary"]["skipped"]
    assert skipped == [
        "memorisation.png: no dynamics files (train.record_dynamics was off)",
        "losses.png: no dynamics files (train.record_dynamics was off)",
    ]
    assert skipped[0] in (tmp_path / "summary.md").read_text()


def test_a_baseline_run_gets_curves_and_summary_only(train_run, tmp_path):
    workdir = train_run("baseline", method="baseline")
    result = make_report(workdir, tmp_path)
    names = ["curves.png", "memorisation.png", "summary.md", "index.html"]
    assert result["files"] == [str(tmp_path / name) for name in names]
    _assert_images(result["files"][:2])
    summary = result["summary"]
    assert summary["cleansing_rounds"] == 0 and "last_flagged" not in summary
    assert summary["final_test_dice"] == _records(workdir)[-1]["test_dice"]


def test_a_folder_that_is_not_a_run_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl") as error:
        make_report(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        make_report(tmp_path)
    assert not (tmp_path / "report").exists()
