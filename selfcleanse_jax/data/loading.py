"""From a config to the train, validation and test slice tables: the phantom or a dataset on disk.

A dataset on disk (`data.root`, in the `data.layout` layout or the one detected) is read case
by case, prepared by `preprocess.prepare_case` and cut into slices once; the slice tables are
cached under `data.cache_dir`, keyed by the dataset's files and the preprocessing settings.
Splits are always by case, never by slice, and keep the cases of one subject (ACDC's two
frames of a patient) together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from selfcleanse_jax.data import acdc, phantom
from selfcleanse_jax.data.cases import SliceTable
from selfcleanse_jax.data.layouts import (
    DatasetInfo,
    dataset_info,
    detect_layout,
    iter_layout,
    layout_files,
)
from selfcleanse_jax.data.preprocess import (
    PreprocessSettings,
    cache_key,
    cached_slice_table,
    default_cache_dir,
)
from selfcleanse_jax.data.slices import cases_to_slices


@dataclasses.dataclass
class Dataset:
    train: SliceTable
    test: SliceTable
    class_names: list[str]  # index 0 is the background
    modality: str = "mri"  # how the intensities were normalised: mri | ct
    val: SliceTable | None = None  # the validation fold, when `data.folds` > 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def per_class(self, values: np.ndarray) -> dict[str, float]:
        """Name the per-foreground-class values of a metric."""
        return {name: float(v) for name, v in zip(self.class_names[1:], values, strict=True)}


def _cases_of(subjects: Sequence[str], chosen: set[str]) -> list[int]:
    return [i for i, s in enumerate(subjects) if s in chosen]


def split_cases(
    subjects: Sequence[str], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(kept, held-out) case indices, a seeded `test_fraction` of the subjects held out.

    `subjects[i]` names the subject of case i: cases of one subject (ACDC's ED and ES frames
    of one patient) always fall on the same side.
    """
    names = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(names))
    num_test = max(1, round(test_fraction * len(names)))
    if num_test >= len(names):
        raise ValueError(f"cannot hold out {num_test} of {len(names)} subjects for testing")
    held = {names[i] for i in order[:num_test]}
    return _cases_of(subjects, set(names) - held), _cases_of(subjects, held)


def kfold_cases(
    subjects: Sequence[str], folds: int, fold: int, seed: int
) -> tuple[list[int], list[int]]:
    """(train, validation) case indices of fold `fold` of a seeded `folds`-fold split of the
    subjects (see `split_cases`)."""
    names = sorted(set(subjects))
    if not 0 <= fold < folds:
        raise ValueError(f"data.fold must lie in 0..{folds - 1}, got {fold}")
    if folds > len(names):
        raise ValueError(f"cannot split {len(names)} training subjects into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(names))
    held = {names[i] for i in np.array_split(order, folds)[fold]}
    return _cases_of(subjects, set(names) - held), _cases_of(subjects, held)


def select_cases(table: SliceTable, cases: Sequence[int]) -> SliceTable:
    """The slices of the given cases (indices into `table.case_names`), their cases renumbered
    in order; the slices keep their ids (`idx`)."""
    cases = list(cases)
    position = np.full(len(table.case_names), -1, np.int32)
    position[cases] = np.arange(len(cases), dtype=np.int32)
    rows = np.flatnonzero(position[table.case_index] >= 0)
    return SliceTable(
        images=table.images[rows],
        labels=table.labels[rows],
        case_index=position[table.case_index[rows]],
        z=table.z[rows],
        case_names=[table.case_names[c] for c in cases],
        spacing=table.spacing[rows],
        idx=table.idx[rows],
    )


def _empty_table(size: int) -> SliceTable:
    return SliceTable(
        images=np.zeros((0, size, size, 1), np.float32),
        labels=np.zeros((0, size, size), np.uint8),
        case_index=np.zeros(0, np.int32),
        z=np.zeros(0, np.int32),
        case_names=[],
        spacing=np.zeros((0, 3), np.float32),
    )


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the phantom and the splits: `data.seed`, or `seed` when that is < 0."""
    return int(config.data.seed) if config.data.seed >= 0 else int(config.seed)


def _phantom(config: ml_collections.ConfigDict) -> tuple[SliceTable, SliceTable, DatasetInfo]:
    data = config.data
    chosen = phantom.get_phantom(data.phantom)
    settings = PreprocessSettings.from_config(config, chosen.modality.lower())

    seed = data_seed(config)

    def cases(numbers):
        return (chosen.make_case(seed, n, data.image_size, data.phantom_slices) for n in numbers)

    train_cases = data.phantom_train_cases
    test = range(train_cases, train_cases + data.phantom_test_cases)
    return (
        cases_to_slices(cases(range(train_cases)), data.image_size, settings=settings),
        cases_to_slices(cases(test), data.image_size, settings=settings),
        DatasetInfo([chosen.labels[k] for k in sorted(chosen.labels)], settings.modality, ""),
    )


def _on_disk(config: ml_collections.ConfigDict) -> tuple[SliceTable, SliceTable, DatasetInfo]:
    """Train and labelled-test tables of `data.root` (the test table empty when it has none),
    and what the dataset is, with the modality its intensities were normalised as."""
    data = config.data
    root = Path(data.root)
    layout = data.layout or detect_layout(root)
    info = dataset_info(root, layout, lits_classes=data.lits_classes)
    settings = PreprocessSettings.from_config(config, info.modality)
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    files = layout_files(root, layout)
    identity = {"root": str(root.resolve()), "layout": layout}
    if layout == "lits":
        identity["lits_classes"] = data.lits_classes

    def table(split: str) -> SliceTable:
        def build() -> SliceTable:
            cases = iter_layout(root, layout, split, lits_classes=data.lits_classes)
            if split == "test":
                cases = [c for c in cases if c.label is not None]
                if not cases:
                    return _empty_table(settings.image_size)
            return cases_to_slices(cases, settings.image_size, settings=settings)

        key = cache_key(files, settings, {**identity, "split": split})
        return cached_slice_table(cache_dir, key, build)

    info = DatasetInfo(info.class_names, settings.modality, layout)
    return table("train"), table("test"), info


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """Slice tables for training, validation (with `data.folds` > 1) and testing.

    Without a labelled test split, `data.test_fraction` of the training cases are held out
    for testing; with `data.folds` = k > 1, fold `data.fold` of the remaining training cases
    validates. The phantom and both splits are seeded by `data_seed`.
    """
    data = config.data
    train, test, info = _on_disk(config) if data.root else _phantom(config)
    subject = acdc.patient_of if info.layout == "acdc" else str
    if not len(test):
        subjects = [subject(name) for name in train.case_names]
        kept, held = split_cases(subjects, data.test_fraction, data_seed(config))
        train, test = select_cases(train, kept), select_cases(train, held)
    val = None
    if data.folds > 1:
        subjects = [subject(name) for name in train.case_names]
        fit, held = kfold_cases(subjects, data.folds, data.fold, data_seed(config))
        train, val = select_cases(train, fit), select_cases(train, held)
    return Dataset(
        train=train, test=test, class_names=info.class_names, modality=info.modality, val=val
    )
