"""The demo's table and results file, on a tiny phantom."""

import json
from pathlib import Path

import pytest

from selfcleanse_jax import cli, demo
from selfcleanse_jax.config import METHODS
from tiny import tiny_config


def test_demo_writes_every_row_in_the_documented_form(tmp_path):
    config = tiny_config(
        **{"train.epochs": 2, "cleanse.warmup_epochs": 1, "train.checkpoint": False}
    )
    results = demo.main(tmp_path, config=config)
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [(r["noise"], r["method"]) for r in saved["rows"]] == [
        (noise, method) for noise in demo.NOISE_KINDS for method in METHODS
    ]
    for row in saved["rows"]:
        assert 0.0 <= row["test_dice"] <= 1.0
        assert set(row["test_dice_per_class"]) == {
            "right ventricle",
            "myocardium",
            "left ventricle",
        }
        cleansing = row["method"] in ("filter", "selfcleanse")
        assert (row["detection"] is not None) == cleansing
        if cleansing:
            assert set(row["detection"]) == {"auc", "precision", "recall"}
        if row["method"] == "selfcleanse":
            # None only when the last round flagged nothing.
            flagged = row["detection"]["precision"] is not None
            assert (row["pseudo_label_dice"] is not None) == flagged
            if flagged:
                assert set(row["pseudo_label_dice"]) == {"given", "cleansed"}
        else:
            assert row["pseudo_label_dice"] is None
    oracle_rows = [r for r in saved["rows"] if r["method"] == "oracle"]
    assert oracle_rows[0]["test_dice"] == oracle_rows[1]["test_dice"]
    table = (tmp_path / "demo_results.md").read_text().splitlines()
    assert len(table) == 2 + len(saved["rows"])
    assert saved["seconds"] > 0
    for run in ("paper-b_baseline", "paper-b_selfcleanse", "paper-l_filter", "paper-b_oracle"):
        summary = (tmp_path / run / "report" / "summary.md").read_text()
        assert f"| method | {run.split('_')[1]} |" in summary
    assert (tmp_path / "paper-l_selfcleanse" / "report" / "losses.png").is_file()
    page = (tmp_path / "index.html").read_text()
    assert page.count("<tr>") == 1 + len(saved["rows"])  # the table: header and rows
    for run in ("paper-b_baseline", "paper-l_selfcleanse", "paper-b_oracle"):
        assert f'<a href="{run}/report/index.html">' in page
    # Asked again, the demo reports its finished runs; with another config it refuses.
    again = demo.main(tmp_path, config=config)
    assert [r["test_dice"] for r in again["rows"]] == [r["test_dice"] for r in saved["rows"]]
    config.train.learning_rate = 0.01
    with pytest.raises(ValueError, match="another config"):
        demo.main(tmp_path, config=config)
    # With --overwrite, the other config is trained afresh and reported as itself.
    fresh = demo.main(tmp_path, config=config, noise_kinds=("paper-b",), overwrite=True)
    before = {r["method"]: r["test_dice"] for r in saved["rows"] if r["noise"] == "paper-b"}
    after = {r["method"]: r["test_dice"] for r in fresh["rows"]}
    assert all(after[method] != before[method] for method in METHODS)
    run_config = json.loads((tmp_path / "paper-b_baseline" / "config.json").read_text())
    assert run_config["train"]["learning_rate"] == 0.01


def test_the_table_shows_a_last_round_that_flagged_nothing_as_missing():
    """No slice flagged: precision and the flagged slices' label Dice are None (not 0)."""
    dice = {"right ventricle": 0.8, "myocardium": 0.7, "left ventricle": 0.9}
    row = {"noise": "paper-b", "test_dice": 0.8, "test_dice_per_class": dice}
    rows = [
        {**row, "method": "baseline", "detection": None, "pseudo_label_dice": None},
        {
            **row,
            "method": "selfcleanse",
            "detection": {"auc": 0.75, "precision": None, "recall": 0.0},
            "pseudo_label_dice": None,
        },
    ]
    table = demo.markdown_table(rows).splitlines()
    assert (
        table[-1]
        == "| paper-b | selfcleanse | 80.0 | 80.0 | 70.0 | 90.0 | 0.750 | n/a | 0.000 |  |"
    )


def test_demo_command_line_overrides_are_typed_and_checked():
    config = cli._apply_overrides(
        demo.demo_config(quick=True),
        ["--config.augment.enabled=False", "--config.train.epochs=3", "--config.noise.rate=0.3"],
    )
    assert config.augment.enabled is False
    assert config.train.epochs == 3 and config.noise.rate == 0.3
    with pytest.raises(cli.UsageError):
        cli._apply_overrides(demo.demo_config(quick=True), ["--epochs=3"])
    with pytest.raises(cli.UsageError, match=r"did you mean --config\.train\?"):
        cli._apply_overrides(demo.demo_config(quick=True), ["--config.trian.epochs=3"])


def test_noise_parameters_pass_through_the_command_line():
    args, overrides = cli.build_parser().parse_known_args(
        [
            "train",
            "--config",
            str(Path(__file__).parents[1] / "configs/phantom.py"),
            "--workdir",
            "unused",
            "--config.noise.kind=boundary",
            "--config.noise.params.radius=(2, 4)",
        ]
    )
    config = cli.train_config(args, overrides)
    assert config.noise.params.radius == (2, 4)
    config = cli._apply_overrides(
        demo.demo_config(quick=True), ["--config.noise.params.unit=component"]
    )
    assert config.noise.params.unit == "component"
