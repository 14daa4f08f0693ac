"""The loop end to end on a tiny phantom: one epoch from the command line, cleansing, resume."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from selfcleanse_jax import records, train
from selfcleanse_jax.checkpoint import Checkpointer
from selfcleanse_jax.cleansing.gmm import split_clean_noisy
from selfcleanse_jax.config import default_config
from selfcleanse_jax.data.loading import load_dataset
from selfcleanse_jax.inference import load_config
from selfcleanse_jax.models.unet import UNetConfig
from tiny import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dataset():
    return load_dataset(tiny_config())


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "selfcleanse_jax.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_train_one_epoch_from_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    result = _cli(
        "train",
        "--config",
        "configs/phantom.py",
        "--workdir",
        str(workdir),
        "--config.train.epochs=1",
        "--config.method=selfcleanse",
        "--config.cleanse.warmup_epochs=0",
        *TINY,
    )
    assert result.returncode == 0, result.stderr
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["epoch"] == 0 and np.isfinite(record["train_loss"])
    assert 0.0 <= record["test_dice"] <= 1.0
    assert set(record["test_dice_per_class"]) == {"right ventricle", "myocardium", "left ventricle"}
    assert "detection" in record["cleanse"]
    assert json.loads((workdir / "config.json").read_text())["method"] == "selfcleanse"
    card = json.loads((workdir / "noise_card.json").read_text())
    assert card["kind"] == "paper-b" and card["rate"] == 0.5
    assert (workdir / "checkpoints").is_dir()
    assert json.loads(result.stdout)["method"] == "selfcleanse"
    # The run's own config.json, given as --config, is the same run: reported, not retrained.
    replay = _cli("train", "--config", str(workdir / "config.json"), "--workdir", str(workdir))
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["reused"] is True


def test_config_files_take_an_argument_and_overrides_name_known_keys(tmp_path):
    from selfcleanse_jax import cli
    from selfcleanse_jax.demo import demo_config

    quick = cli.load_config_file(str(ROOT / "configs/phantom.py:quick"))
    assert quick.to_dict() == demo_config(quick=True).to_dict()
    assert cli.load_config_file(str(ROOT / "configs/phantom.py")).model.depth == 4
    with pytest.raises(cli.UsageError, match="takes no argument"):
        cli.load_config_file(str(ROOT / "configs/msd.py:quick"))
    with pytest.raises(cli.UsageError, match="config.json: invalid JSON"):
        (tmp_path / "config.json").write_text("{")
        cli.load_config_file(str(tmp_path / "config.json"))
    config = cli._apply_overrides(quick, ["--config.train.epochs=3", "--config.method=filter"])
    assert (config.train.epochs, config.method) == (3, "filter")
    with pytest.raises(cli.UsageError, match="--config.train.epoch: the config has no such key"):
        cli._apply_overrides(quick, ["--config.train.epoch=3"])


def test_command_line_errors_are_one_line(tmp_path):
    missing_config = _cli("train", "--workdir", str(tmp_path))
    assert missing_config.returncode == 2
    assert missing_config.stderr.strip().count("\n") == 0
    assert "--config" in missing_config.stderr

    bad_method = _cli(
        "train",
        "--config",
        "configs/phantom.py",
        "--workdir",
        str(tmp_path),
        "--config.method=nonsense",
        *TINY,
    )
    assert bad_method.returncode == 1
    assert bad_method.stderr.strip().splitlines()[-1].startswith("selfcleanse: error: method")
    assert "Traceback" not in bad_method.stderr


@pytest.mark.parametrize("method", ["filter", "selfcleanse"])
def test_cleansing_rounds_reweight_and_relabel(tmp_path, tiny_dataset, method):
    config = tiny_config(
        **{
            "method": method,
            "train.epochs": 2,
            "cleanse.warmup_epochs": 1,
            "noise.kind": "missing",
            "train.checkpoint": False,
        }
    )
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    summary = trainer.run()
    flagged = trainer.bank.flagged
    assert summary["cleanse"]["flagged"] == int(flagged.sum())
    unflagged = ~flagged
    np.testing.assert_array_equal(trainer.bank.targets[unflagged], trainer.bank.given[unflagged])
    # Unflagged slices weigh 1, or cleanse.unlearnt_weight where the model misses a drawn class.
    assert set(np.unique(trainer.bank.weights[unflagged])) <= {1.0, config.cleanse.unlearnt_weight}
    warmup = np.load(tmp_path / "dynamics" / "epoch_0000.npz")
    assert "clean_prob" not in warmup and warmup["train_loss"].shape == (len(tiny_dataset.train),)
    last = np.load(tmp_path / "dynamics" / "epoch_0001.npz")
    np.testing.assert_array_equal(last["clean_prob"], trainer.bank.clean_prob)
    np.testing.assert_array_equal(last["flagged"], flagged)
    assert np.isfinite(last["lfm_loss"]).all()
    # The recorded GMM input is the min-max normalised LFM loss (loss_window 1), and the
    # recorded fit is the mixture fitted on it.
    lfm = last["lfm_loss"].astype(np.float64)
    np.testing.assert_allclose(
        last["lfm_input"], (lfm - lfm.min()) / (lfm.max() - lfm.min()), atol=1e-6
    )
    refit = split_clean_noisy(lfm)
    np.testing.assert_allclose(summary["cleanse"]["gmm_variances"], refit.fit.variances, rtol=1e-4)
    np.testing.assert_allclose(summary["cleanse"]["gmm_weights"], refit.fit.weights, rtol=1e-4)
    if method == "filter":
        assert np.all(trainer.bank.weights[flagged] == 0.0)
        np.testing.assert_array_equal(trainer.bank.targets, trainer.bank.given)
    elif flagged.any():
        assert "pseudo_label_dice" in summary["cleanse"]


def test_an_oracle_lfm_flags_exactly_the_noisy_slices(tmp_path, tiny_dataset):
    config = tiny_config(
        **{
            "method": "filter",
            "train.epochs": 2,
            "cleanse.warmup_epochs": 1,
            "cleanse.lfm_oracle": True,
            "cleanse.unlearnt_below": 0.0,
            "noise.kind": "missing",
            "train.checkpoint": False,
        }
    )
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    record = trainer.cleansing_round(1)
    np.testing.assert_array_equal(trainer.bank.flagged, trainer.noise.is_noisy)
    assert record["detection"]["precision"] == record["detection"]["recall"] == 1.0
    config.noise.kind = "none"
    with pytest.raises(ValueError, match="lfm_oracle needs simulated noise"):
        train.Trainer(config, tmp_path, tiny_dataset)


def test_oracle_trains_on_clean_labels(tmp_path, tiny_dataset):
    config = tiny_config(**{"method": "oracle", "train.epochs": 1, "train.checkpoint": False})
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    np.testing.assert_array_equal(trainer.bank.targets, tiny_dataset.train.labels)
    assert trainer.noise.is_noisy.any()


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_dataset, caplog):
    config = tiny_config(
        **{
            "method": "selfcleanse",
            "train.epochs": 2,
            "cleanse.warmup_epochs": 1,
            "train.checkpoint_every": 1,
        }
    )
    first = train.Trainer(config, tmp_path, tiny_dataset)
    first.run()
    steps = first.steps_per_epoch
    assert first.data_state == {"epoch": 1, "step": steps, "iterator": {"next_index": steps}}
    # As if a longer run had logged epoch 2, died before checkpointing it, and been killed
    # while writing epoch 3's line.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": -1.0}) + "\n" + '{"epoch": 3, "tra')
    config.train.epochs = 3
    second = train.Trainer(config, tmp_path, tiny_dataset)
    checkpointer = Checkpointer(tmp_path)
    assert second.resume(checkpointer) == 2
    checkpointer.close()
    assert second.data_state == first.data_state
    with caplog.at_level("INFO"):
        second.run()
    assert "metrics.jsonl: dropped a torn last line" in caplog.text
    assert "dropped the records of epoch 2 on (1)" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[2]["train_loss"] > 0
    assert int(second.steps.get_state(second.state).step) == 3 * first.steps_per_epoch


def test_an_adaptive_warmup_tracks_the_training_dice_and_ends_at_its_longest(
    tmp_path, tiny_dataset
):
    """Two epochs of a tiny run are too few to fit a curve to: the warm-up lasts its longest
    (half of four epochs), and a resumed run knows when cleansing began."""
    config = tiny_config(
        **{
            "method": "selfcleanse",
            "train.epochs": 4,
            "cleanse.warmup_epochs": 1,
            "cleanse.adaptive_warmup": True,
            "cleanse.warmup_max_fraction": 0.5,
            "train.checkpoint_every": 1,
        }
    )
    first = train.Trainer(config, tmp_path, tiny_dataset)
    first.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("warmup" in r, "cleanse" in r) for r in records] == [
        (True, False),
        (True, False),
        (False, True),
        (False, True),
    ]
    names = ["right ventricle", "myocardium", "left ventricle"]
    for record in records[:2]:
        assert list(record["warmup"]["train_dice_per_class"]) == names
        assert not any(record["warmup"]["saturated"].values())
    assert first.cleansing_from == 2
    second = train.Trainer(config, tmp_path, tiny_dataset)
    checkpointer = Checkpointer(tmp_path)
    assert second.resume(checkpointer) == 4
    checkpointer.close()
    assert second.cleansing_from == 2
    assert second.train_dice_history == [
        [r["warmup"]["train_dice_per_class"][n] for n in names] for r in records[:2]
    ]


def test_phantom_command_then_training_on_it_with_the_msd_config(tmp_path):
    from selfcleanse_jax import cli

    data = tmp_path / "phantom"
    assert (
        cli.main(
            [
                "phantom",
                "--output",
                str(data),
                "--cases",
                "3",
                "--test-cases",
                "1",
                "--image-size",
                "32",
                "--slices",
                "4",
            ]
        )
        == 0
    )
    description = json.loads((data / "dataset.json").read_text())
    assert description["numTraining"] == 3 and len(list((data / "imagesTr").iterdir())) == 3
    workdir = tmp_path / "run"
    settings = [f for f in TINY if "phantom" not in f]
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(ROOT / "configs/msd.py"),
                "--workdir",
                str(workdir),
                f"--config.data.root={data}",
                "--config.train.epochs=1",
                "--config.train.batch_size=4",
                *settings,
            ]
        )
        == 0
    )
    record = json.loads((workdir / "metrics.jsonl").read_text())
    assert set(record["test_dice_per_class"]) == {"right ventricle", "myocardium", "left ventricle"}


def test_sticky_flags_keep_the_lowest_clean_probability(tmp_path, tiny_dataset):
    config = tiny_config(
        **{
            "method": "selfcleanse",
            "train.epochs": 2,
            "cleanse.warmup_epochs": 1,
            "cleanse.sticky": True,
            "cleanse.unlearnt_below": 0.0,  # no slice exempted from the flags
            "train.checkpoint": False,
        }
    )
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    trainer.bank.clean_prob[0] = 0.0
    before = trainer.bank.clean_prob.copy()
    trainer.cleansing_round(1)
    assert trainer.bank.clean_prob[0] == 0.0 and trainer.bank.flagged[0]
    assert np.all(trainer.bank.clean_prob <= before)
    np.testing.assert_array_equal(trainer.bank.flagged, trainer.bank.clean_prob < 0.5)


def test_soft_targets_train_and_stay_distributions(tmp_path, tiny_dataset):
    config = tiny_config(
        **{
            "method": "selfcleanse",
            "train.epochs": 2,
            "cleanse.warmup_epochs": 1,
            "cleanse.soft_targets": True,
            "cleanse.temperature": 0.5,
            "train.checkpoint": False,
        }
    )
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    summary = trainer.run()
    assert np.isfinite(summary["test_dice"])
    soft = trainer.bank.soft.astype(np.float32)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-2)
    unflagged = ~trainer.bank.flagged
    np.testing.assert_array_equal(soft[unflagged].argmax(-1), trainer.bank.given[unflagged])


def test_train_epoch_continues_a_saved_iterator_state_mid_epoch(tmp_path, tiny_dataset):
    config = tiny_config(**{"train.checkpoint": False})
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    assert trainer.steps_per_epoch == 2
    batches = list(trainer.epoch_dataset(1))
    trainer.data_state = {"epoch": 1, "step": 1, "iterator": {"next_index": 1}}
    losses = trainer.train_epoch(1)
    assert np.flatnonzero(np.isfinite(losses)).tolist() == sorted(batches[1]["row"].tolist())
    assert int(trainer.steps.get_state(trainer.state).step) == 1
    assert trainer.data_state == {"epoch": 1, "step": 2, "iterator": {"next_index": 2}}
    assert np.isfinite(trainer.train_epoch(1)).all()


def test_epoch_batches_read_the_bank_as_updated_between_epochs(tmp_path, tiny_dataset):
    config = tiny_config(**{"train.checkpoint": False, "cleanse.soft_targets": True})
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    first = list(trainer.epoch_dataset(0))
    for batch in first:
        np.testing.assert_array_equal(batch["target"], trainer.bank.given[batch["row"]])
        np.testing.assert_array_equal(batch["image"], tiny_dataset.train.images[batch["row"]])
        np.testing.assert_array_equal(batch["idx"], tiny_dataset.train.idx[batch["row"]])
    trainer.bank.targets[...] = 1
    trainer.bank.weights[...] = 0.25
    trainer.bank.soft[...] = 0.5
    for batch in trainer.epoch_dataset(1):
        assert (batch["target"] == 1).all() and (batch["weight"] == 0.25).all()
        assert (batch["soft_target"] == 0.5).all()


def test_read_threads_train_exactly_like_the_in_process_pipeline(tmp_path, tiny_dataset):
    losses = []
    for workers in (0, 2):
        config = tiny_config(**{"train.checkpoint": False, "train.data_workers": workers})
        trainer = train.Trainer(config, tmp_path / str(workers), tiny_dataset)
        losses.append(trainer.train_epoch(0))
    assert np.isfinite(losses[0]).all()
    np.testing.assert_array_equal(losses[0], losses[1])


def test_ema_teacher_drives_the_lfm_and_survives_a_checkpoint(tmp_path, tiny_dataset):
    config = tiny_config(
        **{
            "method": "selfcleanse",
            "train.epochs": 2,
            "cleanse.warmup_epochs": 1,
            "cleanse.teacher_decay": 0.5,
            "train.checkpoint_every": 1,
        }
    )
    trainer = train.Trainer(config, tmp_path, tiny_dataset)
    trainer.run()
    # Epoch 1's LFM losses are the teacher's after epoch 0 (checkpointed), not the model's.
    checkpointer = Checkpointer(tmp_path)
    template = trainer.steps.get_state(trainer.state)
    saved = checkpointer.restore_state(trainer.steps_per_epoch, template)  # after epoch 0
    after_epoch_0 = trainer.steps.put_state(saved)
    lfm = np.load(tmp_path / "dynamics" / "epoch_0001.npz")["lfm_loss"]
    table, given, size = tiny_dataset.train, trainer.bank.given, config.train.eval_batch_size
    steps = trainer.steps
    (round_1,) = [r["cleanse"] for r in records.read_metrics(tmp_path) if r["epoch"] == 1]
    offsets = np.asarray(round_1["lfm_class_offsets"], np.float32)  # the calibrated LFM's
    _, teacher = train.evaluate_losses(
        steps, after_epoch_0, table, given, size, teacher=True, class_offset=offsets
    )
    _, student = train.evaluate_losses(
        steps, after_epoch_0, table, given, size, class_offset=offsets
    )
    np.testing.assert_allclose(lfm, teacher, rtol=1e-5)
    assert not np.allclose(lfm, student, rtol=1e-3)

    resumed = train.Trainer(config, tmp_path, tiny_dataset)
    resumed.resume(checkpointer)
    checkpointer.close()
    restored = resumed.steps.get_state(resumed.state)
    for a, b in zip(
        jax.tree.leaves(restored.teacher), jax.tree.leaves(template.teacher), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_run_folder_holds_one_run(tmp_path):
    """Same config: a finished run is reported from its records; another config is refused
    in one line unless --overwrite, which trains afresh."""
    args = ["train", "--config", "configs/phantom.py", "--workdir", str(tmp_path / "run")]
    args += ["--config.train.epochs=1", "--config.method=baseline", *TINY]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_dice"] == json.loads(first.stdout)["test_dice"]

    again = _cli(*args, "--config.progress=True")  # a key that cannot change the result
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["reused"] is True
    assert "has finished" in again.stderr

    changed = _cli(*args, "--config.train.learning_rate=0.01", "--config.noise.kind=paper-l")
    assert changed.returncode == 1
    message = changed.stderr.strip().splitlines()
    assert len(message) == 1 and "noise.kind, train.learning_rate" in message[0]
    assert "--overwrite" in message[0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary

    afresh = _cli(*args, "--config.noise.kind=paper-l", "--overwrite")
    assert afresh.returncode == 0, afresh.stderr
    assert "reused" not in json.loads(afresh.stdout)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["noise"]["kind"] == "paper-l" and saved["noise"]["rate"] == 0.5
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_config_differences_skip_what_cannot_change_the_result():
    saved = tiny_config().to_dict()
    requested = tiny_config(**{"progress": True, "train.eval_every": 1}).to_dict()
    assert train.config_differences(saved, requested) == []
    saved["data"]["modality"] = "mri"  # filled in by the run, left empty in the request
    assert train.config_differences(saved, requested) == []
    requested["noise"]["params"] = {"radius": [2, 4]}
    requested["cleanse"]["kappa"] = 0.5
    assert train.config_differences(saved, requested) == ["cleanse.kappa", "noise.params"]
    requested["method"] = saved["method"] = "baseline"  # which does not cleanse
    assert train.config_differences(saved, requested) == ["noise.params"]


def test_a_key_an_older_run_lacks_counts_as_its_default():
    saved = tiny_config(method="selfcleanse").to_dict()
    del saved["cleanse"]["lfm_loss"]  # a run from before the key existed
    requested = tiny_config(method="selfcleanse").to_dict()
    assert train.config_differences(saved, requested) == []
    requested["cleanse"]["lfm_loss"] = "boundary"
    assert train.config_differences(saved, requested) == ["cleanse.lfm_loss"]
    del saved["data"]["canonical"]  # a run from before volumes were reoriented
    assert train.config_differences(saved, requested) == ["cleanse.lfm_loss", "data.canonical"]
    del saved["model"]["cpu_conv_library"]  # its CPU convolutions ran on XLA's default
    del saved["model"]["cpu_reduce_library"]  # and its reductions on XLA's own loops
    assert requested["model"]["cpu_conv_library"] == "eigen"
    assert requested["model"]["cpu_reduce_library"] == "ynnpack"
    assert train.config_differences(saved, requested) == [
        "cleanse.lfm_loss",
        "data.canonical",
        "model.cpu_conv_library",
        "model.cpu_reduce_library",
    ]


def test_a_run_folder_read_back_fills_the_keys_its_config_lacks_with_defaults(tmp_path):
    saved = tiny_config(**{"cleanse.kappa": 0.6}).to_dict()
    del saved["model"]["weight_grad_parts"], saved["cleanse"]["lfm_loss"]
    del saved["model"]["cpu_conv_library"], saved["model"]["cpu_reduce_library"]
    calibration = ["calibrate", "calibrate_lfm", "calibrate_estimate", "calibrate_min_share"]
    for key in calibration:
        del saved["cleanse"][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = load_config(tmp_path)
    assert config.cleanse.kappa == 0.6 and config.model.depth == saved["model"]["depth"]
    assert config.model.weight_grad_parts == 1 and config.cleanse.lfm_loss == "ce"
    # Runs from before calibration existed trained without it, whatever today's default.
    assert [config.cleanse[key] for key in calibration] == [False, False, "pooled", 0.0]
    assert default_config().cleanse.calibrate and default_config().cleanse.calibrate_lfm
    # Their CPU convolutions ran on XLA's default library, YNNPACK; their reductions on XLA's.
    assert config.model.cpu_conv_library == "ynnpack"
    assert config.model.cpu_reduce_library == "xla"
    model = UNetConfig.from_config(config.model, 1, 4)
    assert (model.cpu_conv_library, model.cpu_reduce_library) == ("ynnpack", "xla")
    assert default_config().model.cpu_conv_library == "eigen"
    assert default_config().model.cpu_reduce_library == "ynnpack"


def test_warmup_dice_weight_applies_to_the_warmup_of_cleansing_methods_only(tiny_dataset):
    config = tiny_config(
        **{"method": "selfcleanse", "cleanse.warmup_epochs": 2, "cleanse.warmup_dice_weight": 0.0}
    )
    trainer = train.Trainer(config, "unused", tiny_dataset)
    assert [trainer.dice_weight(e) for e in range(4)] == [0.0, 0.0, 1.0, 1.0]
    config.method = "baseline"
    assert train.Trainer(config, "unused", tiny_dataset).dice_weight(0) == 1.0


def test_slices_whose_drawn_structures_the_model_misses_keep_their_labels(tiny_dataset):
    """A new model misses most drawn structures: those slices are not flagged and keep their
    given labels with cleanse.unlearnt_weight; the others go through the LFM as usual."""
    from selfcleanse_jax.cleansing.lcm import unlearnt_structures

    config = tiny_config(
        **{
            "method": "selfcleanse",
            "cleanse.warmup_epochs": 0,
            "cleanse.unlearnt_below": 0.1,
            "cleanse.unlearnt_weight": 3.0,
            "noise.kind": "paper-b",
        }
    )
    trainer = train.Trainer(config, "unused", tiny_dataset)
    # The round's own view: the calibrated LFM's, offsets from every slice at the first round.
    forward = trainer.steps.round_forward(trainer.state, tiny_dataset.train.images, 32)
    areas = trainer.steps.from_round("areas", forward, {})
    offsets = trainer.class_offsets(areas, np.arange(len(trainer.bank.given)))
    predictions, _ = train.evaluate_losses(
        trainer.steps,
        trainer.state,
        tiny_dataset.train,
        trainer.bank.given,
        32,
        class_offset=offsets,
    )
    missed = unlearnt_structures(predictions, trainer.bank.given, 4, 0.1).any(axis=1)
    assert missed.any()
    record = trainer.cleansing_round(0)
    assert sum(record["lfm_view"]["unlearnt"].values()) >= missed.sum()
    bank = trainer.bank
    assert not bank.flagged[missed].any()
    np.testing.assert_array_equal(bank.weights[missed], 3.0)
    np.testing.assert_array_equal(bank.targets[missed], bank.given[missed])
    assert set(np.unique(bank.weights[~missed])) <= {0.0, 1.0 / 3.0, 1.0}  # the LFM's own


def _with_a_nan_pixel(dataset, sample: int):
    """The dataset with one NaN pixel in training slice `sample`: every step that trains on
    it has a non-finite loss."""
    images = dataset.train.images.copy()
    images[sample, 5, 5, 0] = np.nan
    return dataclasses.replace(dataset, train=dataclasses.replace(dataset.train, images=images))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_past_the_limit(
    tmp_path, tiny_dataset
):
    poisoned = _with_a_nan_pixel(tiny_dataset, sample=3)
    config = tiny_config(**{"method": "baseline", "train.epochs": 2, "train.checkpoint": False})
    trainer = train.Trainer(config, tmp_path / "skip", poisoned)
    summary = trainer.run()  # one of the two steps of each epoch is skipped
    lines = (tmp_path / "skip/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["nonfinite_steps"] for line in lines] == [1, 2]
    assert np.isfinite(summary["test_dice"])
    params = jax.tree.leaves(trainer.steps.get_state(trainer.state).params)
    assert all(np.isfinite(p).all() for p in params)

    config.train.nonfinite_limit = 1
    with pytest.raises(train.NonFiniteError, match=r"2 steps skipped .*nonfinite_limit \(1\)"):
        train.Trainer(config, tmp_path / "limit", poisoned).run()
    config.train.nonfinite = "stop"
    with pytest.raises(train.NonFiniteError, match=r"epoch 0\): non-finite .*nonfinite=stop"):
        train.Trainer(config, tmp_path / "stop", poisoned).run()
    assert not (tmp_path / "stop" / "metrics.jsonl").exists()
