"""Evaluate a training run's latest checkpoint on its test (or validation) cases, per case and
per class.

`evaluate(workdir, split)` writes `WORKDIR/eval/metrics.json` (mean Dice and, per class, mean/std of
Dice, IoU and, in mm, HD95, ASSD, pooled HD95 and HD as `metrics.surface_distances` defines
them, plus the number of cases whose distances are undefined) and `WORKDIR/eval/per_case.csv`
(values at full precision). Conventions are those of `metrics.case_metrics`: a class absent
from prediction and reference scores Dice = IoU = 1 and has no distances; a class in only one
of them scores 0 and its distances count as missing (excluded from the distance means).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from selfcleanse_jax import atomic, metrics
from selfcleanse_jax.data.cases import SliceTable
from selfcleanse_jax.data.layouts import detect_layout, iter_layout
from selfcleanse_jax.data.loading import load_dataset
from selfcleanse_jax.inference import TrainedModel, load_config, load_trained
from selfcleanse_jax.predict import segment_volume

SPLITS = ("val", "test")
MEASURES = ("dice", "iou", *metrics.DISTANCES)


def _summary(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(present)), "std": float(np.std(present))}


Volume = tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]
"""(case name, predicted labels, reference labels, voxel spacing in mm) of one case."""


def _prepared_volumes(model: TrainedModel, table: SliceTable) -> Iterator[Volume]:
    """Cases scored on the prepared grid (the phantom, generated on it)."""
    predictions = model.labels(table.images)
    for case, name in enumerate(table.case_names):
        members = table.volume_slices(case)
        spacing = tuple(float(s) for s in table.spacing[members[0]])
        pred = np.moveaxis(predictions[members], 0, -1)  # (H, W, Z)
        yield name, pred, np.moveaxis(table.labels[members], 0, -1), spacing


def _native_volumes(model: TrainedModel, table: SliceTable) -> Iterator[Volume]:
    """Cases of a dataset on disk scored on their own voxel grid, as `predict` segments them:
    each volume is read again (only the cases of `table`) and compared with its label file."""
    data = model.config.data
    root = Path(data.root)
    layout = data.layout or detect_layout(root)
    wanted = set(table.case_names)
    for split in ("train", "test"):
        for case in iter_layout(root, layout, split, lits_classes=data.lits_classes, names=wanted):
            wanted.discard(case.name)
            pred = segment_volume(model, case.image, case.affine, case.spacing)
            yield case.name, pred, case.label, tuple(float(s) for s in case.spacing)
    if wanted:
        raise ValueError(f"{root}: cases {sorted(wanted)} of the run are no longer in the dataset")


def evaluate(workdir: str | Path, split: str = "test", *, write: bool = True) -> dict:
    """Metrics of the latest checkpoint of the run in `workdir` on `split` ("val" or "test").

    The split is rebuilt from the run's config (the phantom from its seed; a dataset on disk
    from its preprocessing cache), so the cases are exactly those the run held out. Cases of
    a dataset on disk are segmented as `predict` does and scored on their own voxel grid
    against their label files, with the spacing of the file's header. "val" needs
    a run trained with `data.folds` > 1. Returns the content of metrics.json; with `write`,
    also writes `WORKDIR/eval/metrics.json` and `per_case.csv` (their `split` says which).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    workdir = Path(workdir)
    load_config(workdir)  # a clear error before anything slow
    model = load_trained(workdir)
    config = model.config
    dataset = load_dataset(config)
    if dataset.num_classes != model.num_classes:
        raise ValueError(
            f"{workdir / 'config.json'}: the data has {dataset.num_classes} classes, "
            f"the checkpoint {model.num_classes}"
        )
    table = dataset.test if split == "test" else dataset.val
    if table is None:
        raise ValueError(
            f"{workdir / 'config.json'}: the run has no validation split "
            "(train with --config.data.folds=K, K > 1)"
        )
    names = dataset.class_names
    volumes = _native_volumes(model, table) if config.data.root else _prepared_volumes(model, table)
    rows = []
    for case, pred, ref, spacing in volumes:
        for c, m in metrics.case_metrics(pred, ref, dataset.num_classes, spacing).items():
            rows.append({"case": case, "class": names[c], **m})

    per_class = {}
    for name in names[1:]:
        mine = [r for r in rows if r["class"] == name]
        per_class[name] = {k: _summary([r[k] for r in mine]) for k in MEASURES}
        per_class[name]["missing_distances"] = sum(r["missing_distance"] for r in mine)
    result = {
        "split": split,
        "epoch": model.epoch,
        "num_cases": len(table.case_names),
        "mean_dice": float(np.mean([per_class[n]["dice"]["mean"] for n in names[1:]])),
        "per_class": per_class,
    }
    if write:
        out = workdir / "eval"
        atomic.write_text(out / "metrics.json", json.dumps(result, indent=1) + "\n")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["case", "class", *MEASURES])
        for r in rows:
            writer.writerow(
                [r["case"], r["class"], *("" if r[k] is None else repr(r[k]) for k in MEASURES)]
            )
        atomic.write_text(out / "per_case.csv", text.getvalue())
    return result
