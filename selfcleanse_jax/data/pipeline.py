"""The training input pipeline on grain: rows in grain's shuffled order -> shard -> batch ->
one gather per batch.

An epoch's order is grain's shuffle of the rows by (seed, epoch), taken once per epoch as
an array of row numbers; each batch is then one indexing of every array by its rows, not a
stack of per-sample dicts (grain's per-element work, about 0.5 ms a sample, held a GPU's
step back). The `row` (where the loop writes the sample's loss back) travels with the
image, target and stable `idx`. A resumed run sees the same order, and the source reads
whatever its arrays hold when a batch is read, so the target bank's updates between epochs
(made in place) reach the next epoch's batches.

Workers are grain read threads (`ReadOptions.num_threads`), not processes: the samples are
in-memory arrays, threads share them (no pickled copies of images and bank per epoch, no
absl flags or `__main__` re-import), and the per-sample work is a copy, not Python compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np


class ArraySource:
    """Rows of several arrays read together: `batch(rows)` gives each array's `rows` plus
    `row`, the row numbers themselves.

    The arrays are read, not copied, so in-place updates are seen by later reads.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {name: len(array) for name, array in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must have the same length, got {lengths}")
        if "row" in arrays:
            raise ValueError("'row' is attached by the source; do not pass it as an array")
        self.arrays = dict(arrays)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Samples `rows` stacked in that order: one indexing of each array."""
        batch = {name: array[rows] for name, array in self.arrays.items()}
        batch["row"] = rows.astype(np.int32)
        return batch


def shuffle_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a function of (seed, epoch) only."""
    return seed * 100_003 + epoch


def epoch_dataset(
    source: ArraySource,
    batch_size: int,
    seed: int,
    epoch: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's full batches of one epoch, shuffled by (seed, epoch).

    Global batch k is rows [k*B*P, (k+1)*B*P) of the shuffled samples (B = `batch_size`, the
    per-process batch; P processes); process p takes its p-th block of B rows, so the
    processes' blocks side by side are the global batch that one process alone would read.
    Samples that do not fill a global batch are dropped, so every process runs the same
    number of steps. Process index and count default to jax's.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    shuffled = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed(seed, epoch))
    usable = len(source) // (batch_size * process_count) * batch_size * process_count
    order = np.fromiter((shuffled[i] for i in range(usable)), dtype=np.int64, count=usable)
    blocks = order.reshape(-1, batch_size)[process_index::process_count]
    return grain.MapDataset.source(list(blocks)).map(source.batch)


def epoch_iterator(
    dataset: grain.MapDataset, workers: int = 0, state: dict[str, Any] | None = None
) -> grain.DatasetIterator:
    """An iterator over `dataset`'s batches, read by `workers` threads (0: in the caller).

    `state` (from `iterator.get_state()`) continues where that iterator stood.
    """
    read = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)
    iterator = iter(dataset.to_iter_dataset(read))
    if state is not None:
        iterator.set_state(state)
    return iterator
