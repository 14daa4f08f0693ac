"""Runs that survive: a run killed at any moment and resumed ends exactly as the same run
never interrupted; checkpoints that cannot be read are set aside, never trusted."""

import json
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from selfcleanse_jax import cli, train
from selfcleanse_jax.checkpoint import Checkpointer, CheckpointError
from tiny import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 2  # the tiny phantom's 16 training slices in batches of 8
RUN = [
    *TINY,
    "--config.method=selfcleanse",
    "--config.train.epochs=4",
    "--config.cleanse.warmup_epochs=1",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every_steps=1",  # inside every epoch too
]


def _command(workdir: Path) -> list[str]:
    """The command line of the tiny run into `workdir`."""
    config = ["--config", "configs/phantom.py"]
    return ["selfcleanse", "train", *config, "--workdir", str(workdir), *RUN]


def _launch(workdir: Path, log: Path) -> subprocess.Popen:
    """`selfcleanse train` of the tiny run in a process of its own (compiled programs come
    from the session's persistent cache, see conftest.py, after the first launch)."""
    command = [sys.executable, "-m", "selfcleanse_jax.cli", *_command(workdir)[1:]]
    with log.open("a") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=out)


def _checkpoint_steps(workdir: Path) -> set[int]:
    """The steps of the finished checkpoints (orbax renames a folder into place when done)."""
    folder = workdir / "checkpoints"
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def _wait_until(process: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """Poll `condition` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    process.kill()
    raise TimeoutError(f"no progress in {timeout} s")


def _kill_when(process: subprocess.Popen, condition, delay: float = 0.0) -> bool:
    """SIGKILL the process once `condition` holds and `delay` seconds more have passed;
    whether it was still running when killed."""
    if not _wait_until(process, condition):
        return False
    time.sleep(delay)
    running = process.poll() is None
    process.kill()
    process.wait()
    return running


def _results(workdir: Path) -> dict:
    """What a finished run leaves, without wall-clock times: its metrics, summary, noise card,
    dynamics and the final checkpoint's state."""
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text())
    for record in [*metrics, summary]:
        record.pop("seconds")
    # the records `report` reads: a process killed inside a write leaves its temporary file
    # (`.PID.partial.epoch_*.npz`), which is no record
    dynamics = {
        path.name: dict(np.load(path))
        for path in sorted((workdir / "dynamics").glob("epoch_*.npz"))
    }
    checkpointer = Checkpointer(workdir, read_only=True)
    step = checkpointer.latest_step()
    state = checkpointer.restore_state(step)
    checkpointer.close()
    card = json.loads((workdir / "noise_card.json").read_text())
    return {"metrics": metrics, "summary": summary, "card": card, "dynamics": dynamics,
            "step": step, "state": state}  # fmt: skip


def test_a_run_stopped_and_killed_at_random_moments_ends_exactly_as_an_uninterrupted_one(
    tmp_path,
):
    """SIGTERM: exit 0 with a checkpoint at the step finished and one line on how to resume;
    then SIGKILL twice, once right after a checkpoint inside an epoch with a cleansing round
    and once at a random moment; then the rest: all equal to the reference bit for bit."""
    # The reference trains in this process, so its programs are compiled (and cached for the
    # processes below) where earlier tests have compiled the model's initialisation.
    args, overrides = cli.build_parser().parse_known_args(_command(tmp_path / "reference")[1:])
    config = cli.train_config(args, overrides)
    train.run(config, args.workdir)

    workdir = tmp_path / "interrupted"
    logs = [tmp_path / f"attempt_{n}.log" for n in range(3)]
    rng = random.Random(0)

    def new_checkpoint(inside_a_cleansing_epoch: bool = False):
        """A condition: a checkpoint newer than now exists (one taken inside an epoch with a
        cleansing round, when asked: after its first step from epoch 1 on)."""
        before = max(_checkpoint_steps(workdir), default=0)

        def inside(step: int) -> bool:
            return step > STEPS_PER_EPOCH and step % STEPS_PER_EPOCH != 0

        return lambda: any(
            step > before and (inside(step) or not inside_a_cleansing_epoch)
            for step in _checkpoint_steps(workdir)
        )

    stopped = _launch(workdir, logs[0])
    assert _wait_until(stopped, new_checkpoint())
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait() == 0, logs[0].read_text()
    last_line = logs[0].read_text().strip().splitlines()[-1]
    assert "stopped by SIGTERM after step" in last_line
    assert last_line.endswith(f"to resume, run the same command: {shlex.join(_command(workdir))}")
    step = int(last_line.split("after step ")[1].split()[0])
    assert max(_checkpoint_steps(workdir)) == step

    kills = _kill_when(_launch(workdir, logs[1]), new_checkpoint(inside_a_cleansing_epoch=True))
    kills += _kill_when(_launch(workdir, logs[2]), new_checkpoint(), rng.uniform(0.0, 0.6))
    text = "".join(log.read_text() for log in logs)
    assert kills == 2, text
    assert f"resumed from the checkpoint of step {step} " in logs[1].read_text()
    assert ", inside epoch 1" in text, text  # a resume inside an epoch with a cleansing round
    train.run(config, workdir)  # the rest, in this process

    expected, got = _results(tmp_path / "reference"), _results(workdir)
    assert got["step"] == expected["step"] == 4 * STEPS_PER_EPOCH
    for name in ("metrics", "summary", "card"):
        assert got[name] == expected[name], name
    assert got["dynamics"].keys() == expected["dynamics"].keys()
    for name, arrays in expected["dynamics"].items():
        assert got["dynamics"][name].keys() == arrays.keys()
        for key, array in arrays.items():
            np.testing.assert_array_equal(got["dynamics"][name][key], array, err_msg=name)
    leaves = jax.tree.leaves(expected["state"])
    assert leaves
    for a, b in zip(jax.tree.leaves(got["state"]), leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def _truncate_largest_file(folder: Path) -> None:
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with largest.open("r+b") as f:
        f.truncate(largest.stat().st_size // 2)


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_one_before_resumed(tmp_path, caplog):
    config = tiny_config(**{"method": "baseline", "train.epochs": 2, "train.checkpoint_every": 1})
    train.Trainer(config, tmp_path).run()  # checkpoints after steps 2 and 4
    _truncate_largest_file(tmp_path / "checkpoints" / "4")
    trainer = train.Trainer(config, tmp_path)
    checkpointer = Checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        assert trainer.resume(checkpointer) == 1  # after epoch 0
    assert "checkpoint of step 4 cannot be read" in caplog.text
    assert "resuming from the checkpoint of step 2" in caplog.text
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir()] == ["4"]
    assert checkpointer.latest_step() == 2

    _truncate_largest_file(tmp_path / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match="no checkpoint can be read .*--overwrite"):
        trainer.resume(checkpointer)
    checkpointer.close()
    assert (tmp_path / "checkpoints" / "2").is_dir()  # nothing moved when none can be read


def test_a_state_with_non_finite_values_never_replaces_a_good_checkpoint(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    good = {"w": np.ones(3, np.float32)}
    bank = {"weights": np.ones(4, np.float32)}
    checkpointer.save(1, good, bank, {"epoch": 0})
    with pytest.raises(ValueError, match="step 2 holds non-finite values; not saved"):
        checkpointer.save(2, {"w": np.array([1.0, np.inf, 0.0], np.float32)}, bank, {})
    assert checkpointer.latest_step() == 1
    np.testing.assert_array_equal(checkpointer.restore(1, good, bank)[0]["w"], good["w"])
    checkpointer.close()
