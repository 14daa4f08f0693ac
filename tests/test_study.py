"""The study: its rows and tables, and a run folder reused when finished, retrained when changed."""

from __future__ import annotations

import json

import numpy as np

from selfcleanse_jax import study
from tiny import tiny_config


def _base(**overrides):
    settings = {"train.epochs": 1, "cleanse.warmup_epochs": 0, "train.checkpoint": False}
    return tiny_config(**{**settings, **overrides})


def test_study_rows_tables_and_reuse(tmp_path):
    kwargs = dict(
        config=_base(),
        datasets=("cardiac",),
        protocols=("paper-b", "paper-l"),
        seeds=(0, 1),
        methods=("baseline", "selfcleanse", "oracle"),
        reports=False,
    )
    results = study.main(tmp_path, **kwargs)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert len(saved["rows"]) == 2 * 2 * 3
    keys = {
        "dataset",
        "protocol",
        "method",
        "seed",
        "test_dice",
        "test_dice_per_class",
        "detection",
        "pseudo_label_dice",
        "lfm_view",
        "label_damage",
    }
    for row in saved["rows"]:
        assert set(row) == keys and row["dataset"] == "cardiac"
        assert 0.0 <= row["test_dice"] <= 1.0
        assert set(row["label_damage"]) == {"dice", "area_ratio"}
        assert (row["detection"] is None) == (row["method"] != "selfcleanse")
    by = {(r["protocol"], r["method"], r["seed"]): r for r in saved["rows"]}
    # One oracle per seed, reported under both protocols with the cell's label damage.
    for seed in (0, 1):
        assert (
            by["paper-b", "oracle", seed]["test_dice"] == by["paper-l", "oracle", seed]["test_dice"]
        )
        assert np.isclose(by["paper-l", "oracle", seed]["label_damage"]["dice"], 2 / 3)
    cell = next(c for c in saved["cells"] if c["protocol"] == "paper-b")
    differences = [
        by["paper-b", "selfcleanse", s]["test_dice"] - by["paper-b", "baseline", s]["test_dice"]
        for s in (0, 1)
    ]
    np.testing.assert_allclose(cell["paired"]["differences"], differences)
    gap = np.mean(
        [
            by["paper-b", "oracle", s]["test_dice"] - by["paper-b", "baseline", s]["test_dice"]
            for s in (0, 1)
        ]
    )
    if gap > 0:
        np.testing.assert_allclose(cell["recovered"], np.mean(differences) / gap)
    table = (tmp_path / "study.md").read_text()
    assert "| cardiac | paper-b |" in table and "| cardiac | paper-l |" in table
    assert "### cardiac · paper-l" in table
    page = (tmp_path / "index.html").read_text()
    assert "<td>cardiac</td><td>paper-b</td>" in page and "<h3>cardiac · paper-l</h3>" in page
    assert 'alt="study.png" src="data:image/png;base64,' in page
    assert page.count('/report/index.html"') == len(list(tmp_path.glob("runs/**/index.html")))

    # Asked again: every finished run is reused, nothing retrained.
    summaries = sorted((tmp_path / "runs").rglob("summary.json"))
    assert len(summaries) == 2 * 2 * 2 + 2  # baseline and selfcleanse per cell, an oracle per seed
    stamps = [p.stat().st_mtime_ns for p in summaries]
    again = study.main(tmp_path, **kwargs, jobs=2)  # worker processes find them finished too
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert [r["test_dice"] for r in again["rows"]] == [r["test_dice"] for r in results["rows"]]

    # A changed config retrains the runs it changes, into the same folders.
    kwargs["config"] = _base(**{"train.learning_rate": 3e-3})
    kwargs["seeds"] = (0,)
    kwargs["protocols"] = ("paper-b",)
    kwargs["methods"] = ("baseline", "selfcleanse")
    retrained = study.main(tmp_path, **kwargs, jobs=2)  # two runs at once, in workers
    assert [r["method"] for r in retrained["rows"]] == ["baseline", "selfcleanse"]
    folder = study.run_folder(tmp_path, "cardiac", "paper-b", "baseline", 0)
    assert json.loads((folder / "config.json").read_text())["train"]["learning_rate"] == 3e-3
    assert (folder / "summary.json").stat().st_mtime_ns != stamps[
        summaries.index(folder / "summary.json")
    ]
