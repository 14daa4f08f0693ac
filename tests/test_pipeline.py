"""The grain input pipeline: the row travels with its sample, seeded order, per-process shards,
iterator state that survives a checkpoint, and bank updates reaching the next epoch."""

import json

import grain
import numpy as np
import pytest

from selfcleanse_jax.checkpoint import Checkpointer
from selfcleanse_jax.data import pipeline

N = 37


def _arrays(n: int = N) -> dict[str, np.ndarray]:
    """Arrays whose row i says i, so a batch shows whether its data match its row."""
    rows = np.arange(n)
    return {
        "image": np.broadcast_to(rows[:, None, None, None], (n, 4, 4, 1)).astype(np.float32),
        "target": np.broadcast_to(rows[:, None, None] % 256, (n, 4, 4)).astype(np.uint8),
        "weight": rows.astype(np.float32) / n,
    }


def _rows(dataset, workers: int = 0) -> list[list[int]]:
    return [batch["row"].tolist() for batch in pipeline.epoch_iterator(dataset, workers)]


def _epoch(arrays=None, batch_size=4, seed=0, epoch=0, process_index=0, process_count=1):
    source = pipeline.ArraySource(_arrays() if arrays is None else arrays)
    return pipeline.epoch_dataset(source, batch_size, seed, epoch, process_index, process_count)


def test_each_row_at_most_once_per_epoch_and_batches_are_full():
    batches = _rows(_epoch(batch_size=4))
    assert len(batches) == N // 4
    assert all(len(batch) == 4 for batch in batches)
    flat = np.concatenate(batches)
    assert len(np.unique(flat)) == len(flat) == N // 4 * 4
    assert flat.min() >= 0 and flat.max() < N


def test_samples_carry_their_row():
    arrays = _arrays()
    for batch in pipeline.epoch_iterator(_epoch(arrays, seed=3, epoch=2)):
        rows = batch["row"]
        assert rows.dtype == np.int32
        np.testing.assert_array_equal(batch["image"], arrays["image"][rows])
        np.testing.assert_array_equal(batch["target"], arrays["target"][rows])
        np.testing.assert_array_equal(batch["weight"], arrays["weight"][rows])


@pytest.mark.parametrize(("process_index", "process_count"), [(0, 1), (1, 3)])
def test_batches_are_grains_per_sample_shuffle_and_batch(process_index, process_count):
    """The batch-at-once gather reads exactly what grain's per-sample shuffle -> batch ->
    shard gives, so the order of every measured run is kept."""
    arrays = _arrays()
    samples = [
        {**{name: array[row] for name, array in arrays.items()}, "row": np.int32(row)}
        for row in range(N)
    ]
    usable = N // (3 * process_count) * 3 * process_count
    per_sample = (
        grain.MapDataset.source(samples)
        .shuffle(seed=pipeline.shuffle_seed(6, 2))[:usable]
        .batch(3, drop_remainder=True)[process_index::process_count]
    )
    gathered = _epoch(arrays, 3, 6, 2, process_index, process_count)
    assert len(gathered) == len(per_sample) > 0
    for expected, batch in zip(per_sample, pipeline.epoch_iterator(gathered), strict=True):
        assert expected.keys() == batch.keys()
        for name in expected:
            assert expected[name].dtype == batch[name].dtype
            np.testing.assert_array_equal(expected[name], batch[name])


def test_order_depends_on_seed_and_epoch_only():
    first = _rows(_epoch(seed=1, epoch=4))
    assert _rows(_epoch(seed=1, epoch=4)) == first
    assert _rows(_epoch(seed=1, epoch=5)) != first
    assert _rows(_epoch(seed=2, epoch=4)) != first
    assert np.concatenate(first).tolist() != list(range(len(np.concatenate(first))))


@pytest.mark.parametrize(("process_count", "batch_size"), [(2, 3), (3, 3), (4, 2)])
def test_process_shards_are_disjoint_and_cover_each_global_batch(process_count, batch_size):
    shards = [
        _rows(_epoch(batch_size=batch_size, seed=7, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    global_batches = _rows(_epoch(batch_size=batch_size * process_count, seed=7))
    assert len(global_batches) == N // (batch_size * process_count)
    for shard in shards:
        assert len(shard) == len(global_batches)
        assert all(len(batch) == batch_size for batch in shard)
    for k, global_batch in enumerate(global_batches):
        parts = [set(shard[k]) for shard in shards]
        assert sum(len(part) for part in parts) == len(set().union(*parts))
        assert set().union(*parts) == set(global_batch)


def test_process_index_out_of_range_is_refused():
    with pytest.raises(ValueError, match="process_index"):
        _epoch(process_index=2, process_count=2)


def test_source_refuses_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="same length"):
        pipeline.ArraySource({"image": np.zeros((3, 2)), "target": np.zeros((4, 2))})


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_yields_exactly_the_remaining_batches(workers):
    dataset = _epoch(seed=5, epoch=1)
    everything = _rows(dataset)
    iterator = pipeline.epoch_iterator(dataset, workers)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    rest = [batch["row"].tolist() for batch in iterator]
    restored = pipeline.epoch_iterator(dataset, workers, state)
    assert [batch["row"].tolist() for batch in restored] == rest == everything[3:]


def test_threaded_workers_give_the_same_batches_as_in_process():
    arrays = _arrays()
    in_process = list(pipeline.epoch_iterator(_epoch(arrays, seed=9), 0))
    threaded = list(pipeline.epoch_iterator(_epoch(arrays, seed=9), 3))
    assert len(threaded) == len(in_process)
    for a, b in zip(in_process, threaded, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("workers", [0, 2])
def test_bank_updates_in_place_reach_the_next_epoch(workers):
    arrays = _arrays()
    before = np.concatenate(
        [b["target"] for b in pipeline.epoch_iterator(_epoch(arrays, epoch=0), workers)]
    )
    assert (before < 200).all()
    arrays["target"][...] = 200
    arrays["weight"][...] = 0.0
    for batch in pipeline.epoch_iterator(_epoch(arrays, epoch=1), workers):
        assert (batch["target"] == 200).all() and (batch["weight"] == 0.0).all()


def test_iterator_state_survives_a_checkpoint(tmp_path):
    dataset = _epoch(seed=2)
    iterator = pipeline.epoch_iterator(dataset)
    next(iterator)
    data = {"epoch": 0, "step": 1, "iterator": iterator.get_state()}
    state = {"w": np.arange(3, dtype=np.float32)}
    bank = {"weights": np.ones(N, np.float32)}
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(0, state, bank, {"epoch": 0}, data)
    checkpointer.save(1, state, bank, {"epoch": 1})
    _, _, _, restored, _ = checkpointer.restore(0, state, bank)
    _, _, meta, missing, _ = checkpointer.restore(1, state, bank)
    checkpointer.close()
    assert restored == data and missing is None and meta == {"epoch": 1}
    resumed = pipeline.epoch_iterator(dataset, 0, restored["iterator"])
    assert [batch["row"].tolist() for batch in resumed] == _rows(dataset)[1:]
