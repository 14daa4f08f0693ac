"""Evaluate a training run's latest checkpoint on its test (or validation) cases, per case and
per class.

`evaluate(workdir, split)` writes `WORKDIR/eval/metrics.json` (mean Dice and, per class, mean/std of
Dice, IoU, HD95 and ASSD in mm plus the number of cases whose distances are undefined) and
`WORKDIR/eval/per_case.csv`. Conventions are those of `metrics.case_metrics`: a class absent
from prediction and reference scores Dice = IoU = 1 and has no distances; a class in only one
of them scores 0 and its distances count as missing (excluded from the distance means).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from selfcleanse_jax import metrics
from selfcleanse_jax.data.loading import load_dataset
from selfcleanse_jax.predict import load_config, load_trained
from selfcleanse_jax.train import evaluate_losses

SPLITS = ("val", "test")
MEASURES = ("dice", "iou", "hd95", "assd")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _summary(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(present)), "std": float(np.std(present))}


def evaluate(workdir: str | Path, split: str = "test", *, write: bool = True) -> dict:
    """Metrics of the latest checkpoint of the run in `workdir` on `split` ("val" or "test").

    The data is rebuilt from the run's config (the phantom from its seed; a dataset on disk
    from its preprocessing cache), so the cases are exactly those the run held out. "val" needs
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
    predictions, _ = evaluate_losses(
        model.steps, model.state, table, table.labels, config.train.eval_batch_size
    )

    names = dataset.class_names
    rows = []
    for case in range(len(table.case_names)):
        members = table.volume_slices(case)
        pred = np.moveaxis(predictions[members], 0, -1)  # (H, W, Z)
        ref = np.moveaxis(table.labels[members], 0, -1)
        spacing = tuple(float(s) for s in table.spacing[members[0]])
        for c, m in metrics.case_metrics(pred, ref, dataset.num_classes, spacing).items():
            rows.append({"case": table.case_names[case], "class": names[c], **m})

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
        _write_atomic(out / "metrics.json", json.dumps(result, indent=1) + "\n")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["case", "class", *MEASURES])
        for r in rows:
            writer.writerow(
                [r["case"], r["class"], *("" if r[k] is None else f"{r[k]:.6g}" for k in MEASURES)]
            )
        _write_atomic(out / "per_case.csv", text.getvalue())
    return result
