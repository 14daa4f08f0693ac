"""Throughput figures: train and forward steps, an epoch, a cleansing round, GMM fits.

Each figure is timed after compilation (one untimed call first) and with the device
synchronised (`block_until_ready`) before the clock stops.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfcleanse_jax import train
from selfcleanse_jax.augment import augment_batch
from selfcleanse_jax.cleansing.gmm import fit_gmm_jax, fit_gmm_sklearn
from selfcleanse_jax.config import default_config
from selfcleanse_jax.data import pipeline
from selfcleanse_jax.data.loading import load_dataset
from selfcleanse_jax.losses import label_targets, per_sample_loss
from selfcleanse_jax.models.conv import (
    CPU_CONV_LIBRARIES,
    CPU_REDUCE_LIBRARIES,
    resolve_parts,
)
from selfcleanse_jax.models.unet import conv_flops_per_image


def _bench_config(image_size: int, train_cases: int):
    """Two epochs of `selfcleanse` on a small phantom, batch 8: what the figures time."""
    config = default_config()
    config.progress = False
    config.method = "selfcleanse"
    config.data.image_size = image_size
    config.data.phantom_train_cases = train_cases
    config.data.phantom_test_cases = 1
    config.train.batch_size = 8
    config.train.epochs = 2
    config.train.eval_every = 0
    config.cleanse.warmup_epochs = 1
    return config


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call, best of `repeats`, after one warm-up call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(size: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """This machine's measured matmul rate on the default device (float32 by default)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * size**3 / _timed(lambda: matmul(a), repeats)


GMM_COMPONENTS = {"separated": ((0.2, 0.05), (0.6, 0.1)), "overlapping": ((0.3, 0.1), (0.45, 0.12))}
"""(mean, sd) of the clean and noisy losses that the GMM timings fit: 70% clean. EM needs
many more iterations on the overlapping pair."""


def gmm_fit_seconds(sizes: tuple[int, ...], repeats: int, components: str = "separated") -> dict:
    rng = np.random.default_rng(0)
    (clean_mean, clean_sd), (noisy_mean, noisy_sd) = GMM_COMPONENTS[components]
    figures: dict = {"jax": {}, "sklearn": {}}
    for n in sizes:
        clean = rng.normal(clean_mean, clean_sd, int(0.7 * n))
        noisy = rng.normal(noisy_mean, noisy_sd, n - len(clean))
        losses = np.concatenate([clean, noisy]).astype(np.float32)
        device_losses = jnp.asarray(losses)
        figures["jax"][str(n)] = _timed(lambda x=device_losses: fit_gmm_jax(x).clean_prob, repeats)
        figures["sklearn"][str(n)] = _timed(
            lambda x=losses: fit_gmm_sklearn(x), max(1, repeats // 2)
        )
    return figures


def train_step_seconds(trainer: train.Trainer, batch: dict, repeats: int) -> float:
    """Seconds per train step of `trainer` on `batch` (its state advances)."""
    key = jax.random.key(0)

    def train_step():
        trainer.state, losses, _ = trainer.steps.train(trainer.state, batch, key)
        return losses

    return _timed(train_step, repeats)


MEMBERS = 3
"""Runs side by side in the members figure (`members_step_seconds`)."""


def members_step_seconds(trainer: train.Trainer, batch: dict, repeats: int) -> float:
    """Seconds per step of `MEMBERS` runs stepping side by side, each in a thread of its own
    with the shared compiled step, as `--config.runs.seeds` trains them (`runs.step=each`);
    best of `repeats` rounds of one step each, after one warm-up round."""
    states = [trainer.steps.init_state(seed=k) for k in range(MEMBERS)]
    key = jax.random.key(0)

    def step(k: int) -> jax.Array:
        states[k], losses, _ = trainer.steps.train(states[k], batch, key)
        return jax.block_until_ready(losses)

    with concurrent.futures.ThreadPoolExecutor(MEMBERS) as pool:
        return _timed(lambda: list(pool.map(step, range(MEMBERS))), repeats)


SPLIT_WEIGHT_GRAD_PARTS = 8
"""`model.weight_grad_parts` of the split-weight-gradient train figure: one part per image."""


def variant_step_seconds(trainer: train.Trainer, batch: dict, repeats: int, **model) -> float:
    """Seconds per train step of the same run with `model` keys overriding its U-Net's
    (`weight_grad_parts`, `cpu_conv_library`, `cpu_reduce_library`), on the same batch and
    data."""
    variant = train.resolved_config(trainer.config)
    for key, value in model.items():
        variant.model[key] = value
    workdir = tempfile.mkdtemp(prefix="selfcleanse_bench_variant_")
    seconds = train_step_seconds(train.Trainer(variant, workdir, trainer.dataset), batch, repeats)
    shutil.rmtree(workdir, ignore_errors=True)
    return seconds


def _trainer(image_size: int, train_cases: int, **model) -> train.Trainer:
    """A fresh bench trainer of `_bench_config`, with `model` keys overriding the U-Net's."""
    config = _bench_config(image_size, train_cases)
    config.noise.kind = "boundary"
    for key, value in model.items():
        config.model[key] = value
    return train.Trainer(
        config, tempfile.mkdtemp(prefix="selfcleanse_bench_"), load_dataset(config)
    )


def _rows(table, size: int) -> np.ndarray:
    return np.arange(size) % len(table)


def _train_batch(trainer: train.Trainer, size: int) -> dict:
    """A training batch of `size` slices (the training slices repeated as needed)."""
    return trainer.bank.batch(trainer.dataset.train, _rows(trainer.dataset.train, size))


def forward_seconds(trainer: train.Trainer, size: int, repeats: int) -> float:
    """Seconds per forward pass (predictions and per-sample losses) of `size` slices."""
    table = trainer.dataset.train
    rows = _rows(table, size)
    batch = {"image": table.images[rows], "target": table.labels[rows]}
    return _timed(lambda: trainer.steps.evaluate(trainer.state, batch), repeats)


def shape_figures(repeats: int, quick: bool) -> dict:
    """Train steps at the shapes a user compares with other codebases: images/s at 128x128
    batch 32, and 256x256 batch 4 (the PyTorch peer's large setting)."""
    figures = {}
    for name, size, batch_size in (("128x128_batch32", 128, 32), ("256x256_batch4", 256, 4)):
        trainer = _trainer(size, 1 if quick else 4)
        batch = _train_batch(trainer, batch_size)
        figures[name] = batch_size / train_step_seconds(trainer, batch, repeats)
        shutil.rmtree(trainer.workdir, ignore_errors=True)
    return figures


def bfloat16_figures(repeats: int, quick: bool) -> dict:
    """Train (batch 8) and forward (batch 32) images/s at 128x128 with bfloat16 compute
    (float32 parameters and loss)."""
    trainer = _trainer(128, 1 if quick else 4, compute_dtype="bfloat16")
    figures = {
        "train_images_per_s": 8 / train_step_seconds(trainer, _train_batch(trainer, 8), repeats),
        "forward_images_per_s": 32 / forward_seconds(trainer, 32, repeats),
    }
    shutil.rmtree(trainer.workdir, ignore_errors=True)
    return figures


def train_step_parts(trainer: train.Trainer, batch: dict, repeats: int) -> dict:
    """Where a train step's time goes, each part jitted alone on `batch` (one device):
    augmentation; the forward pass with its loss; forward and backward to the input only
    (no weight gradients); forward and backward to the parameters; the optimizer's update;
    and the whole step. Differences between them give the backward pass's input and weight
    gradients."""
    steps = trainer.steps
    state = jax.device_put(steps.get_state(trainer.state))  # one copy, on the default device
    graphdef, config = steps.train_graphdef, steps.config
    targets, mask = label_targets(jnp.asarray(batch["target"]), config.num_classes)
    images, idx = jax.device_put((batch["image"], batch["idx"]))

    def loss(params, images):
        model = nnx.merge(graphdef, params, state.batch_stats)
        return jnp.mean(
            per_sample_loss(model(images), targets, mask, dice_weight=config.dice_weight)
        )

    jit = functools.partial(jax.jit, compiler_options=steps.model_config.compiler_options())
    augment = jit(lambda key: augment_batch(key, idx, images, targets, mask, config.augment))
    forward = jit(loss)
    input_grad = jit(jax.grad(loss, argnums=1))
    param_grad = jit(jax.grad(loss))
    grads = param_grad(state.params, images)
    update = jit(lambda grads, opt_state, params: steps.tx.update(grads, opt_state, params))
    key = jax.random.key(0)
    return {
        "augment": _timed(lambda: augment(key), repeats),
        "forward": _timed(lambda: forward(state.params, images), repeats),
        "forward_and_input_grad": _timed(lambda: input_grad(state.params, images), repeats),
        "forward_and_param_grad": _timed(lambda: param_grad(state.params, images), repeats),
        "optimizer": _timed(lambda: update(grads, state.opt_state, state.params), repeats),
        "step": train_step_seconds(trainer, batch, repeats),
    }


EVAL_BATCH_SIZES = (8, 16, 32, 64)
"""The evaluation batch sizes `run` tries for the cleansing round."""


PIPELINE_SLICES = 4096
"""An epoch's slices at which `run` also times the input pipeline: a real training set's
size (ACDC's training volumes hold about 1,900 slices), where the per-epoch shuffle is a
small share."""


def pipeline_samples_per_s(trainer: train.Trainer, epochs: int, slices: int = 0) -> float:
    """Training samples per second that the input pipeline alone delivers (batches read
    from the target bank, shuffled and gathered on the host, as `train_epoch` reads them);
    with `slices`, over epochs of that many (the training slices repeated): grain's shuffle
    costs about the same per epoch below some 10^5 slices, so small epochs understate it."""
    arrays = None
    if slices:
        rows = np.arange(slices) % len(trainer.dataset.train)
        arrays = {
            name: array[rows] for name, array in trainer.bank.arrays(trainer.dataset.train).items()
        }
    start, samples = time.perf_counter(), 0
    for epoch in range(epochs):
        dataset = trainer.epoch_dataset(epoch, arrays)
        for batch in pipeline.epoch_iterator(dataset, trainer.config.train.data_workers):
            samples += len(batch["idx"])
    return samples / (time.perf_counter() - start)


def cleanse_round_seconds(trainer: train.Trainer, eval_batch_size: int) -> float:
    """Seconds per cleansing round (LFM and LCM over the training slices) at this evaluation
    batch size, after one untimed round."""
    trainer.config.train.eval_batch_size = eval_batch_size
    trainer.cleansing_round(1)
    start = time.perf_counter()
    trainer.cleansing_round(1)
    return time.perf_counter() - start


def run(quick: bool = False) -> dict:
    """All figures as a flat JSON-ready dict; `quick` uses fewer repeats and smaller sets."""
    repeats = 2 if quick else 5
    trainer = _trainer(128, 2 if quick else 8)
    steps, table = trainer.steps, trainer.dataset.train
    batch = _train_batch(trainer, 8)
    train_s = train_step_seconds(trainer, batch, repeats)
    parts_s = train_step_parts(trainer, batch, repeats)
    timed_model = {
        "weight_grad_parts": resolve_parts(trainer.config.model.weight_grad_parts),
        "cpu_conv_library": trainer.config.model.cpu_conv_library,
        "cpu_reduce_library": trainer.config.model.cpu_reduce_library,
    }

    def step_s(**model) -> float:  # the settings of the step just timed: its time
        if all(timed_model[key] == value for key, value in model.items()):
            return train_s
        return variant_step_seconds(trainer, batch, repeats, **model)

    split_s = step_s(weight_grad_parts=SPLIT_WEIGHT_GRAD_PARTS)
    plain_s = step_s(weight_grad_parts=1)
    library_s = {library: step_s(cpu_conv_library=library) for library in CPU_CONV_LIBRARIES}
    reduce_s = {library: step_s(cpu_reduce_library=library) for library in CPU_REDUCE_LIBRARIES}
    members_s = members_step_seconds(trainer, batch, repeats)
    forward_s = {size: forward_seconds(trainer, size, repeats) for size in EVAL_BATCH_SIZES}
    best_eval_batch = max(EVAL_BATCH_SIZES, key=lambda size: size / forward_s[size])

    trainer.train_epoch(0)  # compiles nothing new; warms caches
    start = time.perf_counter()
    trainer.train_epoch(1)
    epoch_s = time.perf_counter() - start
    cleanse_s = cleanse_round_seconds(trainer, trainer.config.train.eval_batch_size)
    cleanse_best_s = cleanse_round_seconds(trainer, best_eval_batch)
    pipeline_rate = pipeline_samples_per_s(trainer, epochs=5)
    pipeline_rate_large = pipeline_samples_per_s(trainer, epochs=2, slices=PIPELINE_SLICES)

    shutil.rmtree(trainer.workdir, ignore_errors=True)
    matmul = matmul_flops_per_s(1024 if quick else 2048, repeats)
    height, width = table.images.shape[1:3]
    forward_flops = conv_flops_per_image(steps.model_config, height, width)
    train_flops = 3 * forward_flops * 8 / train_s
    fastest_train = 8 / min(train_s, split_s, *library_s.values(), *reduce_s.values())
    return {
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "num_devices": steps.num_devices,
        "parallel": steps.mode,
        "host": platform.processor() or platform.machine(),
        "image_size": [int(height), int(width)],
        "train_images_per_s": 8 / train_s,
        "train_images_per_s_split_weight_grad": 8 / split_s,
        "train_images_per_s_plain_weight_grad": 8 / plain_s,
        **{f"train_images_per_s_{name}_conv": 8 / s for name, s in library_s.items()},
        **{f"train_images_per_s_{name}_reduce": 8 / s for name, s in reduce_s.items()},
        "members": MEMBERS,
        "members_train_images_per_s": MEMBERS * 8 / members_s,
        "members_over_sequential": train_s * MEMBERS / members_s,
        "train_images_per_s_by_shape": shape_figures(repeats, quick),
        "train_step_parts_s": parts_s,
        "forward_images_per_s": 32 / forward_s[32],
        "forward_images_per_s_by_batch": {str(k): k / v for k, v in forward_s.items()},
        "bfloat16": bfloat16_figures(repeats, quick),
        "epoch_slices": len(table),
        "epoch_train_s": epoch_s,
        "cleanse_round_s": cleanse_s,
        "cleanse_round_s_best_batch": cleanse_best_s,
        "cleanse_round_best_batch": best_eval_batch,
        "cleanse_round_over_epoch_train": cleanse_best_s / epoch_s,
        "pipeline_samples_per_s": pipeline_rate,
        "pipeline_over_step_demand": pipeline_rate / fastest_train,
        f"pipeline_samples_per_s_{PIPELINE_SLICES}_slices": pipeline_rate_large,
        f"pipeline_over_step_demand_{PIPELINE_SLICES}_slices": pipeline_rate_large / fastest_train,
        "gmm_fit_s": gmm_fit_seconds((10_000, 100_000), repeats),
        "gmm_fit_s_overlapping": gmm_fit_seconds((10_000, 100_000), repeats, "overlapping"),
        "matmul_flops_per_s": matmul,
        "forward_flops_per_image": forward_flops,
        "train_flops_per_s": train_flops,
        "train_fraction_of_matmul_peak": train_flops / matmul,
    }


BFLOAT16_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
)
"""Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets, by a substring of
`device_kind` (first match wins, so 'TPU v5 lite' comes before 'TPU v5')."""


def bfloat16_peak(device: jax.Device) -> tuple[float, str]:
    """The device's bfloat16 peak FLOP/s and where the figure comes from: the data sheet
    for a known accelerator, else this device's measured bfloat16 matmul rate."""
    for name, peak in BFLOAT16_PEAK_FLOPS:
        if name in device.device_kind:
            return peak, f"data sheet ({name})"
    return matmul_flops_per_s(2048, 3, jnp.bfloat16), "measured bfloat16 matmul, 2048x2048"


def device_report(
    batch_sizes: tuple[int, ...] = (8, 32, 128),
    image_size: int = 128,
    repeats: int = 3,
    **model,
) -> dict:
    """What a user checks first on a new accelerator: the device, its memory in use, and
    bfloat16 train throughput at each batch size against the device's bfloat16 peak.
    `model` keys override the default U-Net's (tests use a small one)."""
    device = jax.devices()[0]
    peak, peak_source = bfloat16_peak(device)
    trainer = _trainer(image_size, 1, compute_dtype="bfloat16", **model)
    flops = 3 * conv_flops_per_image(trainer.steps.model_config, image_size, image_size)
    throughput = {}
    for size in batch_sizes:
        images_per_s = size / train_step_seconds(trainer, _train_batch(trainer, size), repeats)
        throughput[str(size)] = {
            "train_images_per_s": images_per_s,
            "fraction_of_bfloat16_peak": images_per_s * flops / peak,
        }
    shutil.rmtree(trainer.workdir, ignore_errors=True)
    memory = device.memory_stats() or {}
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "num_devices": jax.device_count(),
        "memory_in_use_bytes": memory.get("bytes_in_use"),
        "memory_peak_bytes": memory.get("peak_bytes_in_use"),
        "memory_limit_bytes": memory.get("bytes_limit"),
        "image_size": [image_size, image_size],
        "train_flops_per_image": flops,
        "bfloat16_peak_flops_per_s": peak,
        "bfloat16_peak_source": peak_source,
        "bfloat16_train": throughput,
    }


SCALING_LAYOUTS = ((1, 1), (1, 2), (1, 4), (2, 2))
"""(processes, devices per process) that `scaling` times, on simulated CPU devices here."""


def step_figures(quick: bool, repeats: int) -> dict:
    """This job's seconds per training step and per LFM sweep, and what each moves between
    devices: the gradient all-reduce (float32, ring: 2(N-1)/N of the parameter bytes per
    device) and the LFM's gather of every training slice's loss and predicted label."""
    config = _bench_config(image_size=64 if quick else 128, train_cases=4)
    config.parallel = "jit"
    workdir = tempfile.mkdtemp(prefix="selfcleanse_scaling_")
    trainer = train.Trainer(config, workdir, load_dataset(config))
    steps, table = trainer.steps, trainer.dataset.train
    per_process = config.train.batch_size // jax.process_count()
    rows = np.arange(per_process) + jax.process_index() * per_process
    batch = trainer.bank.batch(table, rows % len(table))
    step_s = train_step_seconds(trainer, batch, repeats)
    sweep_s = _timed(
        lambda: train.evaluate_losses(
            steps, trainer.state, table, trainer.bank.given, config.train.eval_batch_size
        ),
        repeats,
    )
    shutil.rmtree(workdir, ignore_errors=True)
    n = steps.num_devices
    param_bytes = 4 * sum(np.size(p) for p in jax.tree.leaves(trainer.state.params))
    height, width = table.images.shape[1:3]
    return {
        "processes": jax.process_count(),
        "devices": n,
        "parallel": steps.mode,
        "global_batch": config.train.batch_size,
        "image_size": [int(height), int(width)],
        "train_step_s": step_s,
        "lfm_sweep_s": sweep_s,
        "train_slices": len(table),
        "parameter_bytes": param_bytes,
        "allreduce_bytes_per_device_per_step": 2 * (n - 1) / n * param_bytes,
        # per slice: its loss (float32) and predicted label (uint8 per pixel); each process
        # receives the other processes' share
        "lfm_gather_bytes_per_process_per_round": (
            (jax.process_count() - 1) / jax.process_count() * len(table) * (4 + height * width)
        ),
    }


def scaling(quick: bool = False) -> list[dict]:
    """`step_figures` for each of `SCALING_LAYOUTS`, each layout a fresh job of processes on
    this machine (simulated CPU devices, joined over the loopback interface)."""
    results = []
    for processes, devices in SCALING_LAYOUTS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
        }
        jobs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "selfcleanse_jax.bench",
                    str(index),
                    str(processes),
                    str(port),
                    "quick" if quick else "full",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index in range(processes)
        ]
        outputs = [job.communicate() for job in jobs]
        for job, (_, err) in zip(jobs, outputs, strict=True):
            if job.returncode:
                raise RuntimeError(f"the {processes}x{devices} scaling job failed:\n{err[-2000:]}")
        results.append(json.loads(outputs[0][0].strip().splitlines()[-1]))
    return results


if __name__ == "__main__":  # one process of a `scaling` job: INDEX COUNT PORT quick|full
    index, count, port, size = sys.argv[1:]
    if int(count) > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", int(count), int(index))
    figures = step_figures(size == "quick", repeats=3 if size == "quick" else 10)
    if jax.process_index() == 0:
        print(json.dumps(figures))
