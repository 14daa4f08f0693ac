"""Several processes (hosts) training one model on JAX's distributed runtime.

Every process runs the same command. `initialize` joins them before JAX touches a device:
from `distributed.coordinator`, `num_processes` and `process_id` when given, else from what
`jax.distributed.initialize` detects (SLURM, Cloud TPU, Kubernetes). Each process then feeds
its share of every global batch, and `gather` gives every process the rows of all of them,
so the LFM sees every sample and all processes flag the same slices.
"""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

INITIALIZE = ("auto", "yes", "no")


def _launched_as_several() -> bool:
    """Whether the environment says this is one of several processes of one job."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def wanted(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` (or, with `distributed.initialize=auto`, the environment) asks for the
    distributed runtime."""
    settings = config.get("distributed")
    if settings is None or settings.initialize == "no":
        return False
    if settings.initialize == "yes" or settings.coordinator:
        return True
    return _launched_as_several()


def initialize(config: ml_collections.ConfigDict) -> None:
    """Join the job's other processes when `wanted`; a no-op when already joined or alone."""
    if not wanted(config) or jax.distributed.is_initialized():
        return
    settings = config.distributed
    explicit = {}
    if settings.coordinator:
        explicit = {
            "coordinator_address": settings.coordinator,
            "num_processes": settings.num_processes,
            "process_id": settings.process_id,
        }
    jax.distributed.initialize(**explicit)
    if not is_main():  # process 0 speaks for the job
        logging.getLogger("selfcleanse_jax").setLevel(logging.WARNING)
    log.info(
        "process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_main() -> bool:
    """Whether this process writes the records (logs, metrics, reports, config)."""
    return jax.process_index() == 0


def several() -> bool:
    return jax.process_count() > 1


def gather(tree):
    """Host numpy copies of `tree`: with several processes, each leaf's rows from every
    process in process order (a global array is read whole; a host array is this process's
    rows), so every process holds the same values."""
    if not several():
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def put_replicated(tree, sharding: jax.sharding.Sharding):
    """Place host values that every process holds alike on `sharding`'s devices (each device
    gets the part `sharding` gives it), which may span several processes (`jax.device_put`
    reaches this process's devices only)."""
    if not several():
        return jax.device_put(tree, sharding)

    def put(leaf):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(np.asarray(jax.random.key_data(leaf))))
        leaf = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree.map(put, tree)


def my_rows(size: int) -> slice:
    """This process's contiguous share of `size` rows (divisible by the process count)."""
    share = size // jax.process_count()
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def check_same(name: str, *arrays: np.ndarray) -> None:
    """Raise when the processes hold different `arrays` (compared by a hash of their bytes)."""
    if not several():
        return
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    mine = np.frombuffer(digest.digest()[:8], np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    if not (every == every[0]).all():
        raise RuntimeError(f"the processes' {name} differ: the runs have diverged")


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op alone)."""
    if several():
        multihost_utils.sync_global_devices(name)
