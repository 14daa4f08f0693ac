"""From a config to the train and test slice tables: the phantom or an MSD-layout dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from selfcleanse_jax.data import msd, phantom
from selfcleanse_jax.data.cases import Case, SliceTable
from selfcleanse_jax.data.slices import cases_to_slices


@dataclasses.dataclass
class Dataset:
    train: SliceTable
    test: SliceTable
    class_names: list[str]  # index 0 is the background

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def per_class(self, values: np.ndarray) -> dict[str, float]:
        """Name the per-foreground-class values of a metric."""
        return {name: float(v) for name, v in zip(self.class_names[1:], values, strict=True)}


def split_cases(
    cases: list[Case], test_fraction: float, seed: int
) -> tuple[list[Case], list[Case]]:
    """Hold out whole cases (never single slices) for testing."""
    order = np.random.default_rng(seed).permutation(len(cases))
    num_test = max(1, round(test_fraction * len(cases)))
    if num_test >= len(cases):
        raise ValueError(f"cannot hold out {num_test} of {len(cases)} cases for testing")
    test = set(order[:num_test].tolist())
    return (
        [c for i, c in enumerate(cases) if i not in test],
        [c for i, c in enumerate(cases) if i in test],
    )


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """Slice tables for training and testing, as `config.data` describes."""
    data = config.data
    size = data.image_size
    if not data.root:
        train_cases = [
            phantom.make_case(config.seed, n, size, data.phantom_slices)
            for n in range(data.phantom_train_cases)
        ]
        test_cases = [
            phantom.make_case(config.seed, n, size, data.phantom_slices)
            for n in range(
                data.phantom_train_cases, data.phantom_train_cases + data.phantom_test_cases
            )
        ]
        names = [phantom.LABELS[k] for k in sorted(phantom.LABELS)]
    else:
        root = Path(data.root)
        train_cases, info = msd.read_msd(root, "train")
        test_cases = msd.read_msd(root, "test")[0] if (root / "imagesTs").is_dir() else []
        test_cases = [c for c in test_cases if c.label is not None]
        if not test_cases:
            train_cases, test_cases = split_cases(train_cases, data.test_fraction, config.seed)
        names = [info["labels"][k] for k in sorted(info["labels"], key=int)]
    return Dataset(
        train=cases_to_slices(train_cases, size),
        test=cases_to_slices(test_cases, size),
        class_names=names,
    )
