"""Several runs in one program: each member is the single run its own config.json replays,
and one member's trouble does not reach the others."""

import functools
import json
import threading

import jax
import numpy as np
import optax
import pytest

from selfcleanse_jax import cli, members, settings, train
from selfcleanse_jax.checkpoint import Checkpointer
from selfcleanse_jax.models.unet import UNetConfig
from selfcleanse_jax.steps import StepConfig, Steps
from tiny import tiny_config

MODEL = UNetConfig(num_classes=3, depth=2, base_width=4, max_width=16)


@functools.cache
def _steps() -> Steps:
    """Steps with Adam on one device, compiled once for the tests below."""
    return Steps(MODEL, optax.adam(1e-2), StepConfig(num_classes=3), parallel="none")


PARAMETER_TOLERANCE = 2e-3
"""A mapped step (`runs.step="mapped"`) computes the members' steps as one, to float
rounding: float-level differences in a gradient near zero become parameter differences of
up to Adam's step size (1e-3 here) per step."""


def _params(workdir) -> list[np.ndarray]:
    checkpointer = Checkpointer(workdir)
    try:
        state = checkpointer.restore_state(checkpointer.latest_step())
    finally:
        checkpointer.close()
    params = state["params"] if isinstance(state, dict) else state.params
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_each_member_is_the_single_run_its_config_replays(tmp_path):
    """Two members (seeds 0 and 3) of a selfcleanse run with a cleansing round: each
    member's folder is a complete run whose config.json, replayed as a single run, gives the
    same records, test Dice and parameters, to the bit; run again, every member is reported
    from its records. (The mapped step is compared with single
    steps by test_a_member_with_a_non_finite_loss_leaves_the_other_members_update_alone.)"""
    config = tiny_config(method="selfcleanse", **{"train.epochs": 2, "cleanse.warmup_epochs": 1})
    config.runs.seeds = (0, 3)
    result = members.run(config, tmp_path / "together")
    assert [m["seed"] for m in result["members"]] == [0, 3]
    assert json.loads((tmp_path / "together" / members.MEMBERS_FILE).read_text()) == result
    again = members.run(config, tmp_path / "together")
    assert all(m["summary"]["reused"] for m in again["members"])
    for k, entry in enumerate(result["members"]):
        folder = tmp_path / "together" / f"member_{k}"
        replay = cli.load_config_file(str(folder / "config.json"))
        assert replay.seed == entry["seed"] and not replay.runs.seeds
        single = train.run(replay, tmp_path / f"single_{k}")
        together_records, single_records = _records(folder), _records(tmp_path / f"single_{k}")
        drop_time = lambda records: [{**r, "seconds": None} for r in records]  # noqa: E731
        assert drop_time(together_records) == drop_time(single_records)
        assert entry["summary"]["test_dice"] == single["test_dice"]
        for a, b in zip(_params(folder), _params(tmp_path / f"single_{k}"), strict=True):
            np.testing.assert_array_equal(a, b)


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
        "target": rng.integers(0, 3, (8, 16, 16)).astype(np.uint8),
        "weight": np.ones(8, np.float32),
        "idx": np.arange(8, dtype=np.int32),
    }


def test_a_member_with_a_non_finite_loss_leaves_the_other_members_update_alone():
    """Two members step together; member 1's image holds a NaN. Member 1's update is
    skipped; member 0's is the update it makes alone."""
    steps = _steps()
    together = members.TrainTogether(steps, 2)
    broken = _batch(1)
    broken["image"][0, 0, 0, 0] = np.nan
    key = jax.random.key(5)
    start = [steps.init_state(seed=k) for k in range(2)]
    outcomes = {}

    def step(k, batch):
        outcomes[k] = together.train(k, start[k], batch, key)

    threads = [
        threading.Thread(target=step, args=(0, _batch(0))),
        threading.Thread(target=step, args=(1, broken)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    alone, alone_losses, _ = steps.train(steps.init_state(seed=0), _batch(0), key)
    assert bool(outcomes[0][2]) and not bool(outcomes[1][2])
    np.testing.assert_allclose(outcomes[0][1], alone_losses, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(outcomes[0][0].params), jax.tree.leaves(alone.params), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=PARAMETER_TOLERANCE)
    kept = steps.init_state(seed=1)
    for a, b in zip(
        jax.tree.leaves(outcomes[1][0].params), jax.tree.leaves(kept.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_member_that_stops_does_not_hold_the_others_up():
    """Member 1 leaves after one step (as a failed run does); member 0 goes on alone."""
    steps = _steps()
    together = members.TrainTogether(steps, 2)
    steps_done = {0: 0, 1: 0}

    def member(k: int, count: int) -> None:
        state = steps.init_state(seed=k)
        try:
            for step in range(count):
                state, _, _ = together.train(k, state, _batch(step), jax.random.key(step))
                steps_done[k] += 1
        finally:
            together.leave(k)

    threads = [threading.Thread(target=member, args=(k, n)) for k, n in ((0, 3), (1, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert steps_done == {0: 3, 1: 1}


def test_member_seeds_of_different_lengths_are_refused():
    config = tiny_config()
    config.runs.seeds, config.runs.noise_seeds = (0, 1, 2), (4, 5)
    with pytest.raises(ValueError, match="runs.seeds and runs.noise_seeds"):
        settings.check(config)
    config.runs.noise_seeds = (7,)
    settings.check(config)
    seeds = [(m.seed, m.noise.seed, m.data.seed) for m in members.member_configs(config)]
    assert seeds == [(0, 7, 0), (1, 7, 0), (2, 7, 0)]
