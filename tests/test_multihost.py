"""Several processes train one model: 2 processes x 2 simulated CPU devices, joined by
jax.distributed over the loopback interface, give the run that 1 process x 4 devices gives
on the same global batches: the same flags at every round, the same parameters, one set of
records."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from selfcleanse_jax import distributed, settings, train
from selfcleanse_jax.checkpoint import Checkpointer
from selfcleanse_jax.steps import resolve_parallel
from tiny import TINY, TINY_SETTINGS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
RUN = {
    "method": "selfcleanse",
    "train.epochs": EPOCHS,
    "cleanse.warmup_epochs": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 2,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(workdir: Path, parallel: str) -> list[subprocess.CompletedProcess]:
    """`selfcleanse train` as 2 processes of 2 devices each; their outputs once both end."""
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    overrides = [f"--config.{k}={v}" for k, v in {**RUN, "parallel": parallel}.items()]
    processes = []
    for index in range(2):
        command = [
            sys.executable,
            "-m",
            "selfcleanse_jax.cli",
            "train",
            "--config",
            "configs/phantom.py",
            "--workdir",
            str(workdir),
            *TINY,
            *overrides,
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={index}",
        ]
        processes.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = []
    for process in processes:
        out, _ = process.communicate(timeout=600)
        outputs.append(subprocess.CompletedProcess(process.args, process.returncode, out.decode()))
    return outputs


def _final_params(workdir: Path) -> dict:
    checkpointer = Checkpointer(workdir, read_only=True)
    state = checkpointer.restore_state(checkpointer.latest_step())
    checkpointer.close()
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])
    }


def _flags(workdir: Path) -> dict[int, np.ndarray]:
    return {
        int(f.stem.split("_")[1]): np.load(f)["flagged"]
        for f in sorted((workdir / "dynamics").glob("epoch_*.npz"))
        if "flagged" in np.load(f)
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The run on 1 process x 4 devices (pmap and jit give the same update)."""
    assert jax.device_count() == 4
    workdir = tmp_path_factory.mktemp("single")
    train.run(tiny_config(**RUN, parallel="jit"), workdir)
    return workdir


def _assert_same_run(single: Path, double: Path) -> None:
    flags_single, flags_double = _flags(single), _flags(double)
    assert sorted(flags_single) == list(range(1, EPOCHS))  # a round in every epoch after one
    for epoch, flagged in flags_single.items():
        np.testing.assert_array_equal(flags_double[epoch], flagged, err_msg=f"epoch {epoch}")
    params_single, params_double = _final_params(single), _final_params(double)
    assert params_single.keys() == params_double.keys()
    for name, value in params_single.items():
        np.testing.assert_allclose(params_double[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    summary_single = json.loads((single / "summary.json").read_text())
    summary_double = json.loads((double / "summary.json").read_text())
    assert summary_double["test_dice"] == pytest.approx(summary_single["test_dice"], abs=1e-4)


def _assert_both_ended(results: list[subprocess.CompletedProcess]) -> None:
    for index, result in enumerate(results):
        assert result.returncode == 0, f"process {index}:\n{result.stdout[-3000:]}"


@pytest.mark.parametrize(
    "parallel",
    ["jit", pytest.param("pmap", marks=pytest.mark.slow)],  # pmap: 80 s more
)
def test_two_processes_train_the_model_one_process_trains(one_process, tmp_path, parallel):
    double = tmp_path / "double"
    results = _launch_two(double, parallel)
    _assert_both_ended(results)
    # Process 0 speaks for the job: one set of records, one line per epoch.
    lines = (double / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS
    assert (
        json.loads((double / "config.json").read_text())["train"]["batch_size"]
        == (TINY_SETTINGS["train.batch_size"])
    )
    assert "process 0 of 2" in results[0].stdout
    assert "process 1 of 2" not in results[1].stdout  # the others log warnings only
    _assert_same_run(one_process, double)
    if parallel == "jit":
        # Every process resumes from the collective checkpoint of epoch 1 and ends the same.
        newest = max(int(p.name) for p in (double / "checkpoints").iterdir() if p.name.isdigit())
        shutil.rmtree(double / "checkpoints" / str(newest))
        (double / "summary.json").unlink()
        results = _launch_two(double, parallel)
        _assert_both_ended(results)
        assert "resumed from the checkpoint of step" in results[0].stdout
        assert len((double / "metrics.jsonl").read_text().splitlines()) == EPOCHS
        _assert_same_run(one_process, double)


def test_a_whole_run_under_pmap_is_the_run_under_jit(one_process, tmp_path):
    """The same flags at every round, the same parameters and test Dice on 1 process x 4
    devices, whichever way the steps are mapped over them."""
    train.run(tiny_config(**RUN, parallel="pmap"), tmp_path / "pmap")
    _assert_same_run(one_process, tmp_path / "pmap")


def test_a_coordinator_needs_a_process_count_and_index():
    config = tiny_config()
    config.distributed.coordinator = "127.0.0.1:1234"
    with pytest.raises(ValueError, match="distributed.num_processes must be an integer >= 1"):
        settings.check(config)
    config.distributed.num_processes = 2
    config.distributed.process_id = 2
    with pytest.raises(ValueError, match=r"distributed.process_id must be an integer in \[0, 2\)"):
        settings.check(config)


@pytest.mark.parametrize(
    ("environment", "initialize", "wanted"),
    [
        ({}, "auto", False),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "auto", False),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "auto", True),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "no", False),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "auto", True),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "auto", True),
        ({}, "yes", True),
    ],
)
def test_the_runtime_is_joined_when_the_config_or_the_environment_asks(
    monkeypatch, environment, initialize, wanted
):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = tiny_config()
    config.distributed.initialize = initialize
    assert distributed.wanted(config) is wanted


def test_parallel_none_is_refused_for_several_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="parallel=none trains on one device"):
        resolve_parallel("none")
