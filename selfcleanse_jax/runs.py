"""Many training runs, in this process or at once in worker processes (demo, study).

On a CPU a training run gains little from a second core (XLA's convolutions scale poorly
past one), so `run_many` with `jobs` > 1 trains that many runs at once, each in a worker
process pinned to a core of its own. XLA's CPU convolutions sum in an order that depends on
how many cores the process sees, so a run's figures can differ slightly between jobs = 1
(in this process, every core) and jobs > 1 (one core each); each way is reproducible.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import ml_collections
from tqdm.auto import tqdm

from selfcleanse_jax import report, train
from selfcleanse_jax.data.loading import Dataset, data_seed, load_dataset


@dataclasses.dataclass(frozen=True)
class RunTask:
    """One run: its config (as a dict, to cross to a worker), its folder, whether to write
    its report, and whether a folder holding another config is retrained (else refused)."""

    config: dict
    workdir: str
    make_report: bool = True
    overwrite: bool = False


_DATASETS: dict[str, Dataset] = {}
"""The dataset this process loaded last, by its data settings and seed."""


def _dataset_for(config: ml_collections.ConfigDict) -> Dataset:
    key = json.dumps([config.data.to_dict(), data_seed(config)], sort_keys=True, default=str)
    if key not in _DATASETS:
        _DATASETS.clear()  # runs come grouped by dataset: keep one in memory
        _DATASETS[key] = load_dataset(config)
    return _DATASETS[key]


def train_one(task: RunTask) -> dict:
    """Train one run (or report it from its records when its folder holds it finished)."""
    config = ml_collections.ConfigDict(task.config)
    workdir = Path(task.workdir)
    finished = train.prepare_workdir(train.resolved_config(config), workdir, task.overwrite)
    if finished is not None:
        return finished
    summary = train.run(config, workdir, _dataset_for(config), overwrite=task.overwrite)
    if task.make_report:
        report.make_report(workdir, overlays=False)  # quick: the run's page without them
    return summary


def _pin_worker(counter) -> None:
    """Give each worker process a core of its own (before JAX starts its thread pool)."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[index % len(cores)]})


def default_jobs() -> int:
    """Runs at once: one per core on a CPU, one on an accelerator."""
    import jax

    return len(os.sched_getaffinity(0)) if jax.default_backend() == "cpu" else 1


def run_many(tasks: list[RunTask], jobs: int = 1, desc: str = "runs") -> list[dict]:
    """Every task's summary, in order; with `jobs` > 1 in that many worker processes. The
    first run that fails stops the rest with its error."""
    bar = tqdm(total=len(tasks), desc=desc, unit="run")
    if jobs <= 1:
        summaries = []
        for task in tasks:
            bar.set_postfix_str(Path(task.workdir).name)
            summaries.append(train_one(task))
            bar.update()
        bar.close()
        return summaries
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        min(jobs, len(tasks)) or 1,
        mp_context=context,
        initializer=_pin_worker,
        initargs=(context.Value("i", 0),),
    ) as pool:
        futures = [pool.submit(train_one, task) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            bar.close()
    return [future.result() for future in futures]
