"""The study: methods x noise protocols x datasets x seeds, with mean ± sd and paired differences.

Each (dataset, seed) shares one dataset and seed; each (dataset, protocol, seed) one noise
realisation; the rows of a cell differ by method only. The seed sets the model's
initialisation, the shuffling and augmentation, the phantom and the noise realisation
(`seed` and `noise.seed` both). The oracle trains on the clean labels, which no protocol
touches, so it runs once per (dataset, seed) and is reported under every protocol.

Every run lives in its own folder, `OUTPUT/runs/DATASET/PROTOCOL/seed_S/METHOD/` (the
oracle's: `OUTPUT/runs/DATASET/oracle/seed_S/`); a finished run of the same config is reused,
a folder holding another config is trained afresh (`train.run(..., overwrite=True)`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from selfcleanse_jax import atomic, report
from selfcleanse_jax.config import METHODS
from selfcleanse_jax.data.phantom import PHANTOMS
from selfcleanse_jax.demo import demo_config
from selfcleanse_jax.runs import RunTask, run_many

QUICK_PROTOCOLS = ("paper-b", "paper-l")
QUICK_SEEDS = (0, 1, 2)
QUICK_METHODS = ("baseline", "selfcleanse", "oracle")
"""`study --quick`'s methods: what the gap recovered needs, in the time a CPU allows."""
ALL_PROTOCOLS = (
    "paper-b",
    "paper-l",
    "paper-b-70",
    "paper-l-70",
    "sweep-0.3",
    "sweep-0.5",
    "sweep-0.7",
)


def dataset_name(dataset: str) -> str:
    """A phantom's name as it is, a dataset folder by its last component."""
    return dataset if dataset in PHANTOMS else Path(dataset).name


def dataset_config(base: ml_collections.ConfigDict, dataset: str, seed: int):
    """`base` on one dataset (a phantom name or a dataset folder) at one seed."""
    config = ml_collections.ConfigDict(base.to_dict())
    if dataset in PHANTOMS:
        config.data.root = ""
        config.data.phantom = dataset
    else:
        config.data.root = str(dataset)
    config.seed = seed
    config.noise.seed = seed
    return config


def run_config(config: ml_collections.ConfigDict, protocol: str, method: str):
    """One run of the study: `config` (a dataset at a seed) with a method and a protocol."""
    run = ml_collections.ConfigDict(config.to_dict())
    run.method = method
    run.noise.kind = "none" if method == "oracle" else protocol
    run.noise.rate = -1.0
    return run


def run_folder(output: Path, dataset: str, protocol: str, method: str, seed: int) -> Path:
    base = output / "runs" / dataset_name(dataset)
    if method == "oracle":
        return base / "oracle" / f"seed_{seed}"
    return base / protocol / f"seed_{seed}" / method


def _label_damage(workdir: Path) -> dict | None:
    path = workdir / "noise_card.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["summary"].get("label_damage")


def _row(dataset: str, protocol: str, seed: int, summary: dict, damage: dict | None) -> dict:
    cleanse = summary.get("cleanse") or {}
    return {
        "dataset": dataset_name(dataset),
        "protocol": protocol,
        "method": summary["method"],
        "seed": seed,
        "test_dice": summary["test_dice"],
        "test_dice_per_class": summary["test_dice_per_class"],
        "detection": cleanse.get("detection"),
        "pseudo_label_dice": cleanse.get("pseudo_label_dice"),
        "lfm_view": cleanse.get("lfm_view"),
        "label_damage": damage,
    }


def _mean_sd(values: list[float]) -> str:
    values = 100 * np.asarray(values, float)
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.1f} ± {sd:.1f}"


def _signed(values: list[float] | np.ndarray) -> str:
    return ", ".join(f"{100 * v:+.1f}" for v in values)


def cells(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict[int, dict]]]:
    """Rows grouped by (dataset, protocol), then method, then seed."""
    grouped: dict = {}
    for row in rows:
        cell = grouped.setdefault((row["dataset"], row["protocol"]), {})
        cell.setdefault(row["method"], {})[row["seed"]] = row
    return grouped


def cell_summary(cell: dict[str, dict[int, dict]]) -> dict:
    """Per method mean and sd of the test Dice, the paired selfcleanse − baseline differences
    and the share of the baseline-to-oracle gap they recover (from the means)."""
    out: dict = {"methods": {}}
    for method, by_seed in cell.items():
        dice = [by_seed[s]["test_dice"] for s in sorted(by_seed)]
        out["methods"][method] = {
            "mean": float(np.mean(dice)),
            "sd": float(np.std(dice, ddof=1)) if len(dice) > 1 else 0.0,
            "per_seed": {int(s): by_seed[s]["test_dice"] for s in sorted(by_seed)},
        }
    if {"baseline", "selfcleanse"} <= set(cell):
        seeds = sorted(set(cell["baseline"]) & set(cell["selfcleanse"]))
        diff = [
            cell["selfcleanse"][s]["test_dice"] - cell["baseline"][s]["test_dice"] for s in seeds
        ]
        out["paired"] = {"seeds": seeds, "differences": diff, "mean": float(np.mean(diff))}
        if "oracle" in cell:
            gap = [cell["oracle"][s]["test_dice"] - cell["baseline"][s]["test_dice"] for s in seeds]
            out["gap"] = float(np.mean(gap))
            out["recovered"] = float(np.mean(diff) / np.mean(gap)) if np.mean(gap) > 0 else None
    damage = [r["label_damage"] for m in cell.values() for r in m.values() if r["label_damage"]]
    if damage:
        out["label_damage"] = {
            key: float(np.mean([d[key] for d in damage if d[key] is not None]))
            for key in ("dice", "area_ratio")
        }
    return out


def markdown(rows: list[dict]) -> str:
    """The study as markdown: one line per (dataset, protocol), then per-class detail."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    header = [
        "dataset",
        "protocol",
        "label Dice / area ratio",
        *methods,
        "selfcleanse − baseline (per seed)",
        "gap recovered",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    detail = []
    for (dataset, protocol), cell in cells(rows).items():
        summary = cell_summary(cell)
        damage = summary.get("label_damage")
        paired = summary.get("paired")
        recovered = summary.get("recovered")
        line = [
            dataset,
            protocol,
            f"{damage['dice']:.2f} / {damage['area_ratio']:.2f}" if damage else "",
            *(
                _mean_sd(list(summary["methods"][m]["per_seed"].values()))
                if m in summary["methods"]
                else ""
                for m in methods
            ),
            (f"{100 * paired['mean']:+.1f} ({_signed(paired['differences'])})" if paired else ""),
            f"{100 * recovered:.0f}%" if recovered is not None else "",
        ]
        lines.append("| " + " | ".join(line) + " |")
        detail.append(_cell_detail(dataset, protocol, cell))
    seeds = sorted({r["seed"] for r in rows})
    text = [
        f"Test Dice (%), mean ± sd over seeds {', '.join(map(str, seeds))}; label damage of the "
        "noisy slices (mean Dice to the clean label / foreground area over the clean area); gap "
        "recovered = (selfcleanse − baseline) / (oracle − baseline), from the means.",
        "",
        *lines,
        "",
        *detail,
    ]
    return "\n".join(text)


def _cell_detail(dataset: str, protocol: str, cell: dict[str, dict[int, dict]]) -> str:
    """Per-class means and the LFM's last round, for one (dataset, protocol)."""
    any_row = next(iter(next(iter(cell.values())).values()))
    classes = list(any_row["test_dice_per_class"])
    header = ["method", "test Dice", *classes, "AUC", "precision", "recall", "given → cleansed"]
    lines = [f"### {dataset} · {protocol}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for method in [m for m in METHODS if m in cell]:
        by_seed = list(cell[method].values())
        per_class = [_mean_sd([r["test_dice_per_class"][c] for r in by_seed]) for c in classes]
        detection = [r["detection"] for r in by_seed if r["detection"]]
        pseudo = [r["pseudo_label_dice"] for r in by_seed if r["pseudo_label_dice"]]

        def mean_of(items: list[dict], key: str) -> str:
            values = [d[key] for d in items if d.get(key) is not None]
            return f"{np.mean(values):.2f}" if values else ""

        lines.append(
            "| "
            + " | ".join(
                [
                    method,
                    _mean_sd([r["test_dice"] for r in by_seed]),
                    *per_class,
                    mean_of(detection, "auc"),
                    mean_of(detection, "precision"),
                    mean_of(detection, "recall"),
                    (
                        f"{100 * np.mean([p['given'] for p in pseudo]):.1f} → "
                        f"{100 * np.mean([p['cleansed'] for p in pseudo]):.1f}"
                        if pseudo
                        else ""
                    ),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _label_damage_of_cell(output: Path, dataset: str, protocol: str, seed: int) -> dict | None:
    """The label damage of a cell's noise realisation, from any of its runs' noise cards."""
    cell = run_folder(output, dataset, protocol, "baseline", seed).parent
    for card in sorted(cell.glob("*/noise_card.json")):
        return _label_damage(card.parent)
    return None


def main(
    output: Path,
    quick: bool = False,
    config: ml_collections.ConfigDict | None = None,
    datasets: tuple[str, ...] = tuple(PHANTOMS),
    protocols: tuple[str, ...] = QUICK_PROTOCOLS,
    seeds: tuple[int, ...] = QUICK_SEEDS,
    methods: tuple[str, ...] = METHODS,
    reports: bool = True,
    jobs: int = 1,
) -> dict:
    """Run the study; write `output/study.json` and `output/study.md`; return the results.

    `config` replaces `demo_config(quick)` as the base of every run. With `reports`, each
    run trained here gets its `report/`. `jobs` > 1 trains that many runs at once, each in a
    worker process on a core of its own (`runs.run_many`).
    """
    start = time.perf_counter()
    base = demo_config(quick) if config is None else config
    output.mkdir(parents=True, exist_ok=True)
    cells_wanted = [
        (dataset, seed, protocol)
        for dataset in datasets
        for seed in seeds
        for protocol in protocols
    ]
    tasks: dict[Path, RunTask] = {}  # one run per folder: the oracle's is shared
    for dataset, seed, protocol in cells_wanted:
        for method in methods:
            folder = run_folder(output, dataset, protocol, method, seed)
            config = run_config(dataset_config(base, dataset, seed), protocol, method)
            tasks.setdefault(folder, RunTask(config.to_dict(), str(folder), reports, True))
    summaries = run_many(list(tasks.values()), jobs, "study")
    by_folder = dict(zip(tasks, summaries, strict=True))
    rows = [
        _row(
            dataset,
            protocol,
            seed,
            by_folder[run_folder(output, dataset, protocol, method, seed)],
            _label_damage_of_cell(output, dataset, protocol, seed),
        )
        for dataset, seed, protocol in cells_wanted
        for method in methods
    ]
    results = {
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "quick": quick,
        "jobs": jobs,
        "cells": [
            {"dataset": d, "protocol": p, **cell_summary(cell)}
            for (d, p), cell in cells(rows).items()
        ],
    }
    atomic.write_text(output / "study.json", json.dumps(results, indent=1) + "\n")
    text = markdown(rows)
    atomic.write_text(output / "study.md", text + "\n")
    report.study_page(results, cells(rows), text, output)
    print(text)
    print(
        f"\n{len(tasks)} runs in {results['seconds']:.0f} s ({jobs} at once); results in {output}"
    )
    return results
