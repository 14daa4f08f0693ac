"""The train step gives the same update on one device, under pmap and under jit over a mesh, and
skips an update whose loss or gradient is not finite."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest

from selfcleanse_jax.augment import AugmentConfig
from selfcleanse_jax.data.cases import IGNORE_INDEX
from selfcleanse_jax.losses import label_targets, per_sample_loss
from selfcleanse_jax.models.unet import UNetConfig
from selfcleanse_jax.steps import StepConfig, Steps, resolve_parallel

MODEL = UNetConfig(num_classes=3, depth=2, base_width=4, max_width=16)
CONFIG = StepConfig(num_classes=3, augment=AugmentConfig(enabled=True))


def _batch(seed: int = 0, size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (size, 16, 16)).astype(np.uint8)
    labels[0, :2] = IGNORE_INDEX
    return {
        "image": rng.normal(size=(size, 16, 16, 1)).astype(np.float32),
        "target": labels,
        "weight": rng.uniform(0.0, 1.0, size).astype(np.float32),
        "idx": np.arange(size, dtype=np.int32) + 100,
    }


@functools.cache
def _sgd_steps(mode: str, model=MODEL, config=CONFIG) -> Steps:
    """Steps with SGD, compiled once per test session for each setting."""
    return Steps(model, optax.sgd(0.1), config, parallel=mode)


@functools.cache
def _adam_steps(mode: str, norm: str) -> Steps:
    """Steps with Adam (an optimizer state to compare), compiled once per mode and norm."""
    return Steps(dataclasses.replace(MODEL, norm=norm), optax.adam(1e-2), CONFIG, parallel=mode)


def _one_step(mode: str, model=MODEL, config=CONFIG):
    steps = _sgd_steps(mode, model, config)
    state = steps.init_state(seed=0)
    state, losses, finite = steps.train(state, _batch(), jax.random.key(1))
    assert bool(finite)
    return steps.get_state(state), np.asarray(losses)


def test_simulated_devices_are_present():
    assert jax.local_device_count() == 4
    assert resolve_parallel("auto") == resolve_parallel("shard_map") == "jit"


def test_step_changes_parameters():
    steps = _adam_steps("none", "instance")
    state = steps.init_state(0)
    before = steps.get_state(state)
    after = steps.get_state(steps.train(state, _batch(), jax.random.key(1))[0])
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True)
    ]
    assert all(moved)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_parallel_modes_give_the_same_update_with_either_norm(norm):
    """One step under pmap and under jit over 4 devices equals the single-device step: its
    parameters, optimizer state and batch statistics (BatchNorm averages its batch
    statistics over the whole global batch in every mode); so do the LFM's losses and
    predictions and the LCM's pseudo-labels of a cleansing round's forward pass from the new
    state (6 rows, padded to 8)."""
    batch = _batch()
    rows = {"image": batch["image"][:6], "target": batch["target"][:6]}
    clean_prob = np.linspace(0.0, 1.0, 6, dtype=np.float32)
    after = {}
    for mode in ("none", "pmap", "jit"):
        steps = _adam_steps(mode, norm)
        state, losses, _ = steps.train(steps.init_state(0), batch, jax.random.key(1))
        forward = steps.round_forward(state, rows["image"], 8)
        predictions, lfm_losses = steps.from_round("lfm", forward, {"target": rows["target"]})
        labels = {"target": rows["target"], "clean_prob": clean_prob}
        pseudo, _ = steps.from_round("cleanse", forward, labels)
        outputs = [np.asarray(x) for x in (losses, lfm_losses, predictions, pseudo)]
        after[mode] = (steps.get_state(state), outputs)
    reference, (train_losses, lfm_losses, predictions, pseudo) = after["none"]
    assert jax.tree.leaves(reference.batch_stats) or norm != "batch"
    for mode in ("pmap", "jit"):
        state, outputs = after[mode]
        expected = (train_losses, lfm_losses)
        for name, a, b in zip(("train", "LFM"), outputs[:2], expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{mode} {name}")
        for a, b in zip(outputs[2:], (predictions, pseudo), strict=True):
            assert a.shape == b.shape == (6, 16, 16) and np.mean(a == b) > 0.999, mode
        for part in ("params", "opt_state", "batch_stats"):
            for a, b in zip(
                jax.tree.leaves(getattr(state, part)),
                jax.tree.leaves(getattr(reference, part)),
                strict=True,
            ):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{mode} {part}")


def test_per_sample_losses_equal_one_sample_at_a_time():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 12, 12, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (5, 12, 12))
    labels[2] = 0  # a sample with no foreground
    labels[3, :4] = IGNORE_INDEX
    targets, mask = label_targets(labels, 4)
    batched = per_sample_loss(logits, targets, mask)
    single = [
        float(per_sample_loss(logits[i : i + 1], targets[i : i + 1], mask[i : i + 1])[0])
        for i in range(5)
    ]
    np.testing.assert_allclose(batched, single, rtol=1e-6)


def test_evaluation_losses_do_not_depend_on_the_batch():
    steps = Steps(MODEL, optax.adam(1e-2), CONFIG, parallel="jit")
    state = steps.init_state(0)
    batch = _batch(size=6)  # 6 is padded to 8 over 4 devices
    _, batched = steps.evaluate(state, {"image": batch["image"], "target": batch["target"]})
    single = [
        float(
            steps.evaluate(
                state, {"image": batch["image"][i : i + 1], "target": batch["target"][i : i + 1]}
            )[1][0]
        )
        for i in range(6)
    ]
    assert batched.shape == (6,)
    np.testing.assert_allclose(batched, single, rtol=1e-5)


def test_loss_is_low_for_a_perfect_prediction_and_high_for_a_wrong_one():
    labels = np.zeros((1, 8, 8), np.int64)
    labels[0, 2:6, 2:6] = 1
    targets, mask = label_targets(labels, 2)
    perfect = per_sample_loss(np.asarray(targets) * 40.0 - 20.0, targets, mask)
    wrong = per_sample_loss((1 - np.asarray(targets)) * 40.0 - 20.0, targets, mask)
    assert float(perfect[0]) < 1e-3
    assert float(wrong[0]) > 10.0


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bfloat16_compute_keeps_float32_parameters(dtype):
    model = dataclasses.replace(MODEL, compute_dtype=dtype)
    state, losses = _one_step("none", model)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(state.params))
    assert np.all(np.isfinite(losses))


def test_ema_teacher_follows_the_parameters_in_every_mode():
    config = dataclasses.replace(CONFIG, teacher_decay=0.75)
    steps = Steps(MODEL, optax.sgd(0.1), config, parallel="none")
    initial = steps.get_state(steps.init_state(seed=0))
    reference, _ = _one_step("none", config=config)
    for before, after, teacher in zip(
        jax.tree.leaves(initial.params),
        jax.tree.leaves(reference.params),
        jax.tree.leaves(reference.teacher),
        strict=True,
    ):
        # The first update's decay is min(0.75, 1 - 1/2): the average of the two.
        np.testing.assert_allclose(teacher, 0.5 * before + 0.5 * after, rtol=1e-5, atol=1e-7)
    for mode in ("pmap", "jit"):
        state, _ = _one_step(mode, config=config)
        teachers = zip(
            jax.tree.leaves(state.teacher), jax.tree.leaves(reference.teacher), strict=True
        )
        for a, b in teachers:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=mode)


def test_teacher_evaluation_uses_the_teacher_and_falls_back_to_the_model():
    batch = _batch(size=4)
    inputs = {"image": batch["image"], "target": batch["target"]}
    plain = Steps(MODEL, optax.sgd(0.5), CONFIG, parallel="none")
    state, _, _ = plain.train(plain.init_state(0), _batch(size=4), jax.random.key(1))
    assert state.teacher is None
    np.testing.assert_array_equal(
        plain.evaluate(state, inputs, teacher=True)[1], plain.evaluate(state, inputs)[1]
    )
    config = dataclasses.replace(CONFIG, teacher_decay=0.9)
    ema = Steps(MODEL, optax.sgd(0.5), config, parallel="none")
    fresh = ema.init_state(0)
    state, _, _ = ema.train(ema.init_state(0), _batch(size=4), jax.random.key(1))
    student = np.asarray(ema.evaluate(state, inputs)[1])
    teacher = np.asarray(ema.evaluate(state, inputs, teacher=True)[1])
    assert not np.allclose(student, teacher)
    # After one step the teacher is the average of the initial and trained weights.
    initial = np.asarray(ema.evaluate(fresh, inputs)[1])
    assert np.abs(teacher - initial).sum() < np.abs(student - initial).sum()


def test_evaluation_with_class_offsets_scores_the_calibrated_softmax():
    """Offset 0 changes nothing; lowering every foreground class far enough leaves only
    background, whose loss against an all-background label then falls."""
    steps = Steps(MODEL, optax.sgd(0.5), CONFIG, parallel="none")
    state = steps.init_state(0)
    batch = _batch(size=4)
    inputs = {"image": batch["image"], "target": np.zeros_like(batch["target"])}
    plain_labels, plain_losses = steps.evaluate(state, inputs)
    offset = np.zeros((4, CONFIG.num_classes), np.float32)
    labels, losses = steps.evaluate(state, {**inputs, "class_offset": offset})
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
    offset[:, 1:] = 30.0
    labels, losses = steps.evaluate(state, {**inputs, "class_offset": offset})
    assert not np.any(np.asarray(labels)) and np.all(np.asarray(losses) < plain_losses)


def test_lfm_loss_weights_the_dice_term_on_its_own():
    batch = _batch(size=4)
    inputs = {"image": batch["image"], "target": batch["target"]}

    def eval_losses(**changes):
        steps = Steps(MODEL, optax.sgd(0.1), dataclasses.replace(CONFIG, **changes), "none")
        return np.asarray(steps.evaluate(steps.init_state(0), inputs)[1])

    ce_only = eval_losses(dice_weight=0.0)
    np.testing.assert_allclose(eval_losses(lfm_dice_weight=0.0), ce_only, rtol=1e-6)
    np.testing.assert_allclose(eval_losses(dice_weight=0.0, lfm_dice_weight=1.0), eval_losses())
    assert np.all(eval_losses() > ce_only)

    with_dice = eval_losses(lfm_dice_weight=1.0) - ce_only
    boundary = eval_losses(lfm_loss="boundary", lfm_dice_weight=0.0)
    np.testing.assert_allclose(
        eval_losses(lfm_loss="boundary", lfm_dice_weight=1.0), boundary + with_dice, rtol=1e-5
    )
    assert not np.allclose(boundary, ce_only)
    with pytest.raises(ValueError, match="cleanse.lfm_loss"):
        dataclasses.replace(CONFIG, lfm_loss="dice")


def test_soft_targets_give_cross_entropy_and_hard_labels_give_dice():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
    hard, mask = label_targets(rng.integers(0, 3, (3, 8, 8)), 3)
    soft = rng.dirichlet(np.ones(3), (3, 8, 8)).astype(np.float32)

    def loss(targets, **kwargs):
        return np.asarray(per_sample_loss(logits, targets, mask, **kwargs))

    dice_of_hard = loss(hard) - loss(hard, dice_weight=0.0)
    np.testing.assert_allclose(
        loss(soft, dice_targets=hard), loss(soft, dice_weight=0.0) + dice_of_hard, rtol=1e-5
    )


def test_train_step_takes_cross_entropy_from_soft_targets_and_dice_from_hard_labels():
    batch = _batch()
    hard, _ = label_targets(batch["target"], 3)
    noisy = np.random.default_rng(1).dirichlet(np.ones(3), batch["target"].shape)
    one_hot = {**batch, "soft_target": np.asarray(hard, np.float16)}
    soft = {**batch, "soft_target": noisy.astype(np.float16)}

    def first_losses(sample_batch, dice_weight):
        config = StepConfig(
            num_classes=3,
            soft_targets=True,
            dice_weight=dice_weight,
            augment=AugmentConfig(enabled=False),
        )
        steps = Steps(MODEL, optax.sgd(0.1), config, parallel="none")
        return np.asarray(steps.train(steps.init_state(0), sample_batch, jax.random.key(1))[1])

    cross_entropy_change = first_losses(soft, 0.0) - first_losses(one_hot, 0.0)
    np.testing.assert_allclose(
        first_losses(soft, 1.0) - first_losses(one_hot, 1.0), cross_entropy_change, atol=1e-5
    )


@pytest.mark.parametrize("mode", ["none", "pmap", "jit"])
def test_a_non_finite_loss_or_gradient_skips_the_update_in_every_parallel_mode(mode):
    """A NaN pixel gives a non-finite loss; an infinite weight finite losses but a
    non-finite gradient. Either way the whole state (parameters, optimiser, batch statistics
    under pmap and shard_map, teacher without) stays bit for bit as it was, but for its step
    count."""
    # Settings other tests compile too (positional, as _one_step passes them).
    if mode == "none":
        steps = _sgd_steps(mode, MODEL, dataclasses.replace(CONFIG, teacher_decay=0.75))
    else:
        steps = _adam_steps(mode, "batch")
    nan_pixel, infinite_weight = _batch(), _batch()
    nan_pixel["image"][5, 3, 3] = np.nan  # a sample on the second of four devices
    infinite_weight["weight"][2] = np.inf
    state = steps.init_state(0)
    before = steps.get_state(state)
    for step, batch in enumerate([nan_pixel, infinite_weight], 1):
        state, _, finite = steps.train(state, batch, jax.random.key(1))
        assert not bool(finite)
        after = steps.get_state(state)
        assert int(after.step) == step
        kept = jax.tree.leaves(after.replace(step=before.step))
        for a, b in zip(kept, jax.tree.leaves(before), strict=True):
            np.testing.assert_array_equal(a, b)
    state, _, finite = steps.train(state, _batch(), jax.random.key(1))
    assert bool(finite) and int(steps.get_state(state).step) == 3


@pytest.mark.parametrize("flip", [False, True])
def test_a_rounds_one_forward_pass_gives_what_separate_passes_give(flip):
    """The LFM's labels and losses derived from the round's kept logits equal the teacher's
    evaluation; its LCM pseudo-labels and margin areas equal those of the flip-averaged
    softmax computed afresh; asking for some rows alone gives those rows' outputs; a round
    whose logits exceed its memory budget gives the same outputs."""
    from flax import nnx

    from selfcleanse_jax.cleansing.lcm import cleanse_batch, margin_areas
    from selfcleanse_jax.models.unet import class_probabilities, model_graphdefs

    config = dataclasses.replace(CONFIG, teacher_decay=0.9, flip_average=flip)
    steps = Steps(MODEL, optax.sgd(0.5), config, parallel="jit")
    state, _, _ = steps.train(steps.init_state(0), _batch(size=8), jax.random.key(1))
    batch = _batch(seed=2, size=11)  # three batches of 4 rows, the last padded
    forward = steps.round_forward(state, batch["image"], 4)
    labels, losses = steps.from_round("lfm", forward, {"target": batch["target"]})
    direct = steps.evaluate(state, {"image": batch["image"], "target": batch["target"]}, True)
    np.testing.assert_array_equal(labels, direct[0])
    np.testing.assert_allclose(losses, direct[1], rtol=1e-6)

    kept = steps.get_state(state)
    teacher = nnx.merge(model_graphdefs(MODEL)[1], kept.teacher, kept.batch_stats)
    probs = class_probabilities(teacher, batch["image"], flip)
    np.testing.assert_array_equal(steps.from_round("areas", forward, {}), margin_areas(probs))
    clean_prob = np.linspace(0.0, 1.0, 11, dtype=np.float32)
    inputs = {"target": batch["target"], "clean_prob": clean_prob}
    pseudo, _ = steps.from_round("cleanse", forward, inputs)
    expected, _ = cleanse_batch(probs, batch["target"], clean_prob, config.lcm)
    assert np.mean(pseudo == np.asarray(expected)) > 0.999
    # Past the memory budget each derived step runs its batch's forward pass again.
    rerun = steps.round_forward(state, batch["image"], 4, keep_gb=0.0)
    assert all(logits is None for _, logits in rerun.batches)
    np.testing.assert_array_equal(steps.from_round("cleanse", rerun, inputs)[0], pseudo)
    rerun_losses = steps.from_round("lfm", rerun, {"target": batch["target"]})[1]
    np.testing.assert_array_equal(rerun_losses, losses)
    some = np.array([1, 2, 9])
    np.testing.assert_array_equal(
        steps.from_round("cleanse", forward, inputs, only=some)[0], pseudo[some]
    )
