"""The demo: baseline, filter, selfcleanse and oracle on the noisy phantom, one table.

Every run shares one dataset, one seed and, per noise model, one noise realisation, so the
rows differ by method only. The oracle trains on the clean labels, which do not depend on the
noise model, so it runs once and is reported under each noise model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections

from selfcleanse_jax import atomic, report
from selfcleanse_jax.config import METHODS, default_config
from selfcleanse_jax.runs import RunTask, run_many

NOISE_KINDS = ("paper-b", "paper-l")


def demo_config(quick: bool) -> ml_collections.ConfigDict:
    """The default phantom setting; `quick` shrinks data and model to run in minutes on a CPU."""
    config = default_config()
    config.progress = True
    if quick:
        config.data.image_size = 64
        config.data.phantom_train_cases = 12
        config.data.phantom_test_cases = 12
        config.data.phantom_slices = 6
        config.model.depth = 3
        config.model.base_width = 16
        config.train.epochs = 40
        config.train.batch_size = 8
        config.train.learning_rate = 2e-3
        config.train.eval_batch_size = 24  # 72 training slices: three batches, no padding
        config.train.eval_every = 0
    return config


def _row(noise: str, summary: dict) -> dict:
    cleanse = summary.get("cleanse") or {}
    return {
        "noise": noise,
        "method": summary["method"],
        "test_dice": summary["test_dice"],
        "test_dice_per_class": summary["test_dice_per_class"],
        "detection": cleanse.get("detection"),
        "pseudo_label_dice": cleanse.get("pseudo_label_dice"),
    }


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table (Dice in percent)."""
    classes = list(rows[0]["test_dice_per_class"])
    header = [
        "noise",
        "method",
        "test Dice",
        *classes,
        "detection AUC",
        "precision",
        "recall",
        "flagged-label Dice given → cleansed",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        det = row["detection"]
        pl = row["pseudo_label_dice"]
        cells = [
            row["noise"],
            row["method"],
            f"{100 * row['test_dice']:.1f}",
            *(f"{100 * row['test_dice_per_class'][c]:.1f}" for c in classes),
        ]
        if det:
            cells += [
                f"{det[key]:.3f}" if det[key] is not None else "n/a"
                for key in ("auc", "precision", "recall")
            ]
        else:
            cells += ["", "", ""]
        cells.append(f"{100 * pl['given']:.1f} → {100 * pl['cleansed']:.1f}" if pl else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    output: Path,
    quick: bool = False,
    config: ml_collections.ConfigDict | None = None,
    noise_kinds: tuple[str, ...] = NOISE_KINDS,
    overwrite: bool = False,
    jobs: int = 1,
) -> dict:
    """Run the comparison; write `output/demo_results.json` and `.md`, each run's report
    (`output/NOISE_METHOD/report/`) and `output/index.html`, a page linking them; print the
    table.

    `config` replaces `demo_config(quick)`; each run sets its own method and noise kind, one
    of `noise_kinds` (noise models or presets). A run folder that already holds this run is
    reported from its records; one holding another config is refused unless `overwrite`.
    `jobs` > 1 trains that many runs at once (`runs.run_many`).
    """
    start = time.perf_counter()
    config = demo_config(quick) if config is None else config
    output.mkdir(parents=True, exist_ok=True)
    tasks, order = {}, []
    for noise in noise_kinds:
        for method in METHODS:
            run_config = ml_collections.ConfigDict(config.to_dict())
            run_config.method = method
            run_config.noise.kind = noise
            # The oracle trains on the clean labels, whatever the noise: it runs once.
            first = noise_kinds[0] if method == "oracle" else noise
            workdir = output / f"{first}_{method}"
            if method == "oracle":
                run_config.noise.kind = first
            tasks.setdefault(workdir, RunTask(run_config.to_dict(), str(workdir), True, overwrite))
            order.append((noise, workdir))
    folders = list(tasks)
    summaries = dict(zip(folders, run_many(list(tasks.values()), jobs, "demo"), strict=True))
    rows = [_row(noise, summaries[workdir]) for noise, workdir in order]
    results = {"rows": rows, "seconds": time.perf_counter() - start}
    atomic.write_text(output / "demo_results.json", json.dumps(results, indent=1) + "\n")
    table = markdown_table(rows)
    atomic.write_text(output / "demo_results.md", table + "\n")
    report.results_page("Demo", table, output, intro=f"{len(tasks)} training runs")
    print(table)
    print(f"\n{len(tasks)} training runs in {results['seconds']:.0f} s; results in {output}")
    return results
