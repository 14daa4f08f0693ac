"""Splits by case and by subject: held-out and validation cases never share a subject."""

from __future__ import annotations

import numpy as np
import pytest

from selfcleanse_jax.data import phantom
from selfcleanse_jax.data.acdc import patient_of, write_acdc
from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.loading import kfold_cases, load_dataset, select_cases, split_cases
from tiny import tiny_config


def test_split_keeps_the_cases_of_a_subject_together():
    subjects = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4", "p5", "p5"]
    kept, held = split_cases(subjects, 0.4, seed=3)
    assert sorted(kept + held) == list(range(10))
    assert {subjects[i] for i in kept}.isdisjoint({subjects[i] for i in held})
    assert len({subjects[i] for i in held}) == 2
    assert split_cases(subjects, 0.4, seed=3) == (kept, held)  # seeded


def test_kfold_folds_partition_the_subjects():
    subjects = [f"p{i // 2}" for i in range(14)]
    seen = []
    for fold in range(3):
        train, val = kfold_cases(subjects, 3, fold, seed=0)
        assert sorted(train + val) == list(range(14))
        assert {subjects[i] for i in train}.isdisjoint({subjects[i] for i in val})
        seen += val
    assert sorted(seen) == list(range(14))
    with pytest.raises(ValueError, match="data.fold"):
        kfold_cases(subjects, 3, 3, seed=0)
    with pytest.raises(ValueError, match="8 folds"):
        kfold_cases(subjects, 8, 0, seed=0)


def test_select_cases_renumbers_and_keeps_slices():
    table = load_dataset(tiny_config()).train
    picked = select_cases(table, [2, 0])
    assert picked.case_names == [table.case_names[2], table.case_names[0]]
    np.testing.assert_array_equal(picked.images[picked.case_index == 0], table.images[8:12])
    assert len(picked) == 8
    np.testing.assert_array_equal(picked.idx, [0, 1, 2, 3, 8, 9, 10, 11])  # ids kept


@pytest.mark.parametrize("hold_out", ["data.test_fraction", "data.folds"])
def test_a_slice_keeps_its_id_and_its_noise_whatever_is_held_out(tmp_path, hold_out):
    """The same slice (case, z) has the same id and noise record under two splits."""
    from selfcleanse_jax.train import run_noise

    root = phantom.write_phantom_dataset(
        tmp_path / "data", num_train=6, num_test=0, seed=0, image_size=32, num_slices=3
    )
    settings = {"data.test_fraction": [0.2, 0.5], "data.folds": [2, 3]}[hold_out]
    seen = []
    for value in settings:
        config = tiny_config(
            **{
                "data.root": str(root),
                "data.cache_dir": str(tmp_path / "cache"),
                "noise.kind": "boundary",
                hold_out: value,
            }
        )
        dataset = load_dataset(config)
        train = dataset.train
        records = run_noise(config, dataset).records
        seen.append(
            {
                (train.case_names[c], int(z)): (int(i), record)
                for c, z, i, record in zip(
                    train.case_index, train.z, train.idx, records, strict=True
                )
            }
        )
    shared = seen[0].keys() & seen[1].keys()
    assert shared and seen[0].keys() != seen[1].keys()
    assert any(seen[0][key][1]["noisy"] for key in shared)
    for key in shared:
        assert seen[0][key] == seen[1][key]


def test_acdc_patients_stay_whole_across_test_and_validation(tmp_path):
    def case(n):
        c = phantom.make_case(0, n, 16, 2)
        return Case(c.name, c.image, c.label, c.spacing, c.affine)

    patients = {f"patient{p:03d}": (case(2 * p), case(2 * p + 1)) for p in range(1, 7)}
    root = write_acdc(tmp_path / "acdc", patients, split_dir="")
    config = tiny_config(
        **{
            "data.root": str(root),
            "data.cache_dir": str(tmp_path / "cache"),
            "data.test_fraction": 0.34,
            "data.folds": 2,
        }
    )
    dataset = load_dataset(config)
    splits = [dataset.train, dataset.val, dataset.test]
    patients_of = [{patient_of(n) for n in table.case_names} for table in splits]
    assert [len(p) for p in patients_of] == [2, 2, 2]
    assert set.union(*patients_of) == set(patients)
    assert all(len(t.case_names) == 2 * len(p) for t, p in zip(splits, patients_of, strict=True))
