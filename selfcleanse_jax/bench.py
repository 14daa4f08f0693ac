"""Throughput figures: train and forward steps, an epoch, a cleansing round, GMM fits.

Each figure is timed after compilation (one untimed call first) and with the device
synchronised (`block_until_ready`) before the clock stops.
"""

from __future__ import annotations

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

from selfcleanse_jax import train
from selfcleanse_jax.cleansing.gmm import fit_gmm_jax, fit_gmm_sklearn
from selfcleanse_jax.config import default_config
from selfcleanse_jax.data.loading import load_dataset
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


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """This machine's measured float32 matmul rate on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * size**3 / _timed(lambda: matmul(a), repeats)


def gmm_fit_seconds(sizes: tuple[int, ...], repeats: int) -> dict:
    rng = np.random.default_rng(0)
    figures: dict = {"jax": {}, "sklearn": {}}
    for n in sizes:
        clean = rng.normal(0.2, 0.05, int(0.7 * n))
        noisy = rng.normal(0.6, 0.1, n - len(clean))
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


SPLIT_WEIGHT_GRAD_PARTS = 8
"""`model.weight_grad_parts` of the split-weight-gradient train figure: one part per image."""


def split_weight_grad_step_seconds(config, trainer: train.Trainer, batch: dict, repeats: int):
    """Seconds per train step of the same run with `model.weight_grad_parts` set, on the same
    batch and data."""
    split = train.resolved_config(config)
    split.model.weight_grad_parts = SPLIT_WEIGHT_GRAD_PARTS
    workdir = tempfile.mkdtemp(prefix="selfcleanse_bench_split_")
    seconds = train_step_seconds(train.Trainer(split, workdir, trainer.dataset), batch, repeats)
    shutil.rmtree(workdir, ignore_errors=True)
    return seconds


def run(quick: bool = False) -> dict:
    """All figures as a flat JSON-ready dict; `quick` uses fewer repeats and smaller sets."""
    repeats = 2 if quick else 5
    config = _bench_config(image_size=128, train_cases=2 if quick else 8)
    config.noise.kind = "boundary"
    workdir = tempfile.mkdtemp(prefix="selfcleanse_bench_")
    trainer = train.Trainer(config, workdir, load_dataset(config))
    steps, table = trainer.steps, trainer.dataset.train
    batch = trainer.bank.batch(table, np.arange(8) % len(table))
    train_s = train_step_seconds(trainer, batch, repeats)
    split_s = split_weight_grad_step_seconds(config, trainer, batch, repeats)
    forward_batch = {
        "image": np.resize(table.images, (32, *table.images.shape[1:])),
        "target": np.resize(table.labels, (32, *table.labels.shape[1:])),
    }
    forward_s = _timed(lambda: steps.evaluate(trainer.state, forward_batch), repeats)

    trainer.train_epoch(0)  # compiles nothing new; warms caches
    start = time.perf_counter()
    trainer.train_epoch(1)
    epoch_s = time.perf_counter() - start
    trainer.cleansing_round(1)
    start = time.perf_counter()
    trainer.cleansing_round(1)
    cleanse_s = time.perf_counter() - start

    shutil.rmtree(workdir, ignore_errors=True)
    matmul = matmul_flops_per_s(1024 if quick else 2048, repeats)
    height, width = table.images.shape[1:3]
    train_flops = 3 * conv_flops_per_image(steps.model_config, height, width) * 8 / train_s
    return {
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "num_devices": steps.num_devices,
        "parallel": steps.mode,
        "host": platform.processor() or platform.machine(),
        "image_size": [int(height), int(width)],
        "train_images_per_s": 8 / train_s,
        "train_images_per_s_split_weight_grad": 8 / split_s,
        "forward_images_per_s": 32 / forward_s,
        "epoch_slices": len(table),
        "epoch_train_s": epoch_s,
        "cleanse_round_s": cleanse_s,
        "gmm_fit_s": gmm_fit_seconds((10_000, 100_000), repeats),
        "matmul_flops_per_s": matmul,
        "train_flops_per_s": train_flops,
        "train_fraction_of_matmul_peak": train_flops / matmul,
    }


SCALING_LAYOUTS = ((1, 1), (1, 2), (1, 4), (2, 2))
"""(processes, devices per process) that `scaling` times, on simulated CPU devices here."""


def step_figures(quick: bool, repeats: int) -> dict:
    """This job's seconds per training step and per LFM sweep, and what each moves between
    devices: the gradient all-reduce (float32, ring: 2(N-1)/N of the parameter bytes per
    device) and the LFM's gather of every training slice's loss and predicted label."""
    config = _bench_config(image_size=64 if quick else 128, train_cases=4)
    config.parallel = "shard_map"
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
