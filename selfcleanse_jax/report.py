"""Plots and a summary of one training run, to see how label noise and the LFM/LCM evolve.

`make_report(workdir)` reads what `train.Trainer` wrote (metrics.jsonl, config.json,
noise_card.json, dynamics/epoch_NNNN.npz, the last checkpoint) and writes curves.png,
lfm.png, losses.png, memorisation.png, overlays.png, summary.md and index.html, a page
that holds all of them. Inputs a run may lack (dynamics, noise card, checkpoint) skip their
plot, never fail.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from selfcleanse_jax import atomic
from selfcleanse_jax.config import METHODS
from selfcleanse_jax.records import read_dynamics, read_metrics

log = logging.getLogger(__name__)

DETECTION_KEYS = ("auc", "precision", "recall")


# ------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def noise_truth(card: dict | None) -> dict[int, bool] | None:
    """Sample id -> truly noisy, from the noise card; None when there is no noise to know."""
    if card is None or card.get("kind", "none") == "none":
        return None
    return {int(record["id"]): bool(record["noisy"]) for record in card["records"]}


def slice_groups(idx: np.ndarray, truth: dict[int, bool] | None) -> dict[str, np.ndarray]:
    """Masks over a round's slices, matched to the card by sample id (the dynamics' `idx`):
    {"clean", "noisy"}, or {"all"} without truth."""
    if truth is None:
        return {"all": np.ones(len(idx), bool)}
    noisy = np.array([truth[int(i)] for i in idx], bool)
    return {"clean": ~noisy, "noisy": noisy}


def gmm_input_quartiles(
    rounds: dict[int, dict[str, np.ndarray]], truth: dict[int, bool] | None
) -> dict[str, np.ndarray]:
    """Per group, the (rounds, 3) 25th/50th/75th percentiles of the GMM input over the rounds
    in epoch order (NaN where the group is empty or the input was degenerate)."""
    quartiles: dict[str, list] = {}
    for arrays in (rounds[epoch] for epoch in sorted(rounds)):
        for name, mask in slice_groups(arrays["idx"], truth).items():
            values = arrays["lfm_input"][mask]
            values = values[np.isfinite(values)]
            row = np.percentile(values, [25, 50, 75]) if values.size else np.full(3, np.nan)
            quartiles.setdefault(name, []).append(row)
    return {name: np.array(rows) for name, rows in quartiles.items()}


# ------------------------------------------------------------------------------ plotting


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    with atomic.replacing(path, "wb") as f:
        figure.savefig(f, format=path.suffix[1:], dpi=100)
    return path


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def _mark_warmup_end(axes, warmup_end: int | None) -> None:
    if warmup_end is not None:
        axes.axvline(warmup_end, color="grey", linestyle="--", label="first cleansing round")


def plot_curves(records: list[dict], warmup_end: int | None, path: Path) -> Path:
    """Training loss per epoch; test Dice (mean and per class) at the evaluated epochs."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, dice_axes = figure.subplots(1, 2, sharex=True)
    loss_axes.plot([r["epoch"] for r in records], [r["train_loss"] for r in records], "o-")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    evaluated = [r for r in records if "test_dice" in r]
    epochs = [r["epoch"] for r in evaluated]
    dice_axes.plot(epochs, [r["test_dice"] for r in evaluated], "ko-", linewidth=2, label="mean")
    for name in evaluated[-1]["test_dice_per_class"] if evaluated else []:
        dice = [r["test_dice_per_class"].get(name, np.nan) for r in evaluated]
        dice_axes.plot(epochs, dice, ".-", label=name)
    dice_axes.set(xlabel="epoch", ylabel="Dice", title="Test Dice", ylim=(0, 1))
    for axes in (loss_axes, dice_axes):
        _mark_warmup_end(axes, warmup_end)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(dice_axes)
    return _save(figure, path)


def plot_lfm(rounds: list[dict], path: Path) -> Path:
    """Per cleansing round: flagged slices, detection quality, pseudo-label Dice."""
    epochs = [r["epoch"] for r in rounds]
    cleanse = [r["cleanse"] for r in rounds]
    panels = [("flagged slices", "count", {"flagged": [c["flagged"] for c in cleanse]})]
    if any("detection" in c for c in cleanse):
        detection = {
            key: [_or_nan((c.get("detection") or {}).get(key)) for c in cleanse]
            for key in DETECTION_KEYS
        }
        panels.append(("Noisy-label detection", "score", detection))
    if any(c.get("pseudo_label_dice") for c in cleanse):
        dice = {
            f"{key} labels": [_or_nan((c.get("pseudo_label_dice") or {}).get(key)) for c in cleanse]
            for key in ("given", "cleansed")
        }
        panels.append(("Flagged slices' Dice vs clean", "Dice", dice))
    figure = Figure(figsize=(4.5 * len(panels), 4), layout="constrained")
    for axes, (title, ylabel, series) in zip(
        np.atleast_1d(figure.subplots(1, len(panels))), panels, strict=True
    ):
        for label, values in series.items():
            axes.plot(epochs, values, "o-", label=label)
        axes.set(xlabel="epoch (cleansing round)", ylabel=ylabel, title=title)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(axes)
    figure.axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(figure, path)


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value


def plot_losses(
    rounds: dict[int, dict[str, np.ndarray]],
    truth: dict[int, bool] | None,
    gmm_by_epoch: dict[int, dict],
    path: Path,
) -> Path:
    """GMM input per group over the rounds (median and interquartile band), and histograms at
    the first, middle and last round with the fitted mixture's component densities."""
    epochs = sorted(rounds)
    shown = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]})
    figure = Figure(figsize=(4.5 * max(len(shown), 2), 8), layout="constrained")
    grid = figure.add_gridspec(2, len(shown))
    trend = figure.add_subplot(grid[0, :])
    for name, quartiles in gmm_input_quartiles(rounds, truth).items():
        (line,) = trend.plot(epochs, quartiles[:, 1], "o-", label=f"{name} (median)")
        trend.fill_between(
            epochs, quartiles[:, 0], quartiles[:, 2], alpha=0.25, color=line.get_color()
        )
    trend.set(xlabel="epoch (cleansing round)", ylabel="normalised LFM loss (GMM input)")
    trend.set_title("GMM input per slice: median and interquartile range")
    trend.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(trend)
    grid_x = np.linspace(0.0, 1.0, 201)
    for column, epoch in enumerate(shown):
        axes = figure.add_subplot(grid[1, column])
        arrays = rounds[epoch]
        groups = slice_groups(arrays["idx"], truth)
        values = [arrays["lfm_input"][mask] for mask in groups.values()]
        values = [v[np.isfinite(v)] for v in values]
        if sum(v.size for v in values):
            axes.hist(values, bins=20, range=(0, 1), stacked=True, density=True, label=list(groups))
        gmm = gmm_by_epoch.get(epoch)
        if gmm and not gmm.get("gmm_degenerate"):
            parts = zip(gmm["gmm_weights"], gmm["gmm_means"], gmm["gmm_variances"], strict=True)
            for label, (weight, mean, variance) in zip(("clean", "noisy"), parts, strict=True):
                density = np.exp(-((grid_x - mean) ** 2) / (2 * variance))
                density *= weight / np.sqrt(2 * np.pi * variance)
                axes.plot(grid_x, density, linewidth=2, label=f"{label} component")
        axes.set(xlabel="GMM input", ylabel="density", title=f"epoch {epoch}")
        _legend(axes)
    return _save(figure, path)


def plot_memorisation(
    dynamics: dict[int, dict[str, np.ndarray]],
    truth: dict[int, bool] | None,
    warmup_end: int | None,
    path: Path,
) -> Path:
    """Each slice's training loss against its training target over the epochs, coloured by
    whether its given label is truly noisy, with each group's median: memorisation shows as
    the noisy slices' losses falling to the clean ones'. At the cleansing rounds, also the
    Dice of the model's prediction to the given label per group: memorisation shows as the
    noisy slices' Dice rising to the clean ones'."""
    epochs = sorted(dynamics)
    first = dynamics[epochs[0]]
    order = np.argsort(first["idx"])
    losses = np.stack([dynamics[e]["train_loss"][np.argsort(dynamics[e]["idx"])] for e in epochs])
    groups = slice_groups(first["idx"][order], truth)
    rounds = [e for e in epochs if "prediction_given_dice" in dynamics[e]]
    figure = Figure(figsize=(16.5 if rounds else 11, 4), layout="constrained")
    paths, ratio, *given = figure.subplots(1, 3 if rounds else 2)
    colours = {"clean": "tab:blue", "noisy": "tab:red", "all": "tab:grey"}
    for name, mask in groups.items():
        if not mask.any():
            continue
        colour = colours[name]
        paths.plot(epochs, losses[:, mask], color=colour, alpha=0.12, linewidth=0.7)
        median = np.nanmedian(losses[:, mask], axis=1)
        paths.plot(epochs, median, color=colour, linewidth=2.5, label=f"{name} (median)")
    paths.set(xlabel="epoch", ylabel="training loss (log scale)", yscale="log")
    paths.set_title("Per-slice training loss against the training target")
    if {"clean", "noisy"} <= groups.keys() and groups["clean"].any() and groups["noisy"].any():
        clean = np.nanmedian(losses[:, groups["clean"]], axis=1)
        noisy = np.nanmedian(losses[:, groups["noisy"]], axis=1)
        ratio.plot(epochs, noisy / clean, "o-", color="tab:purple")
        ratio.axhline(1.0, color="grey", linewidth=0.8)
    ratio.set(xlabel="epoch", ylabel="median loss, noisy / clean slices")
    ratio.set_title("Memorisation: how far the noisy slices' loss stays above")
    if rounds:
        dice = np.stack(
            [dynamics[e]["prediction_given_dice"][np.argsort(dynamics[e]["idx"])] for e in rounds]
        )
        for name, mask in groups.items():
            if mask.any():
                mean = np.nanmean(dice[:, mask], axis=1)
                given[0].plot(rounds, mean, "o-", color=colours[name], label=f"{name} (mean)")
        given[0].set(xlabel="epoch (cleansing round)", ylabel="Dice to the given label")
        given[0].set_title("The model's prediction against the given label")
        _legend(given[0])
    for axes in (paths, ratio, *given):
        _mark_warmup_end(axes, warmup_end)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(paths)
    return _save(figure, path)


OVERLAY_COLUMNS = ("clean label", "given label", "training target", "prediction")


def overlay_examples(
    last_round: dict[str, np.ndarray], truth: dict[int, bool] | None, per_group: int = 3
) -> tuple[list[int], set[int]]:
    """The slices `overlays.png` draws, by sample id: up to `per_group` flagged, then up to
    `per_group` not flagged, all truly noisy when the truth is known; and the flagged ids."""
    ids = [int(i) for i in last_round["idx"]]
    flagged = {i for i, f in zip(ids, last_round["flagged"], strict=True) if f}
    noisy = [i for i in sorted(ids) if truth is None or truth.get(i)]
    chosen = [i for i in noisy if i in flagged][:per_group]
    return chosen + [i for i in noisy if i not in flagged][:per_group], flagged


def plot_overlays(
    workdir: Path, last_round: dict[str, np.ndarray], truth: dict[int, bool] | None, path: Path
) -> Path:
    """Example slices of the last cleansing round, flagged and not: the image with its clean
    and given labels, the target the run trained on last (the pseudo-label of a flagged
    slice) and the final model's prediction. Truly noisy slices are shown when known."""
    from matplotlib.patches import Patch

    from selfcleanse_jax.board import class_colour, overlay
    from selfcleanse_jax.checkpoint import Checkpointer
    from selfcleanse_jax.data.cases import IGNORE_INDEX
    from selfcleanse_jax.data.loading import load_dataset
    from selfcleanse_jax.inference import load_trained
    from selfcleanse_jax.train import run_noise

    model = load_trained(workdir)
    dataset = load_dataset(model.config)
    train = dataset.train
    given = run_noise(model.config, dataset).noisy_labels
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        targets = checkpointer.restore_bank(checkpointer.latest_step())["targets"]
    finally:
        checkpointer.close()
    row_of = {int(i): row for row, i in enumerate(train.idx)}
    chosen, flagged = overlay_examples(last_round, truth)
    rows = np.array([row_of[i] for i in chosen], int)
    predictions = model.labels(train.images[rows])
    figure = Figure(figsize=(10, 2.6 * max(len(rows), 1)), layout="constrained")
    axes = figure.subplots(max(len(rows), 1), len(OVERLAY_COLUMNS), squeeze=False)
    for r, (sample, row) in enumerate(zip(chosen, rows, strict=True)):
        labels = (train.labels[row], given[row], targets[row], np.asarray(predictions)[r])
        for c, (title, label) in enumerate(zip(OVERLAY_COLUMNS, labels, strict=True)):
            axes[r, c].imshow(overlay(train.images[row, ..., 0], np.asarray(label)))
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title)
        state = "flagged" if sample in flagged else "not flagged"
        axes[r, 0].set_ylabel(f"slice {sample}\n{state}")
    figure.suptitle("Truly noisy slices of the last round" if truth else "Slices of the last round")
    classes = dict(enumerate(dataset.class_names[1:], start=1)) | {IGNORE_INDEX: "ignored"}
    handles = [
        Patch(facecolor=class_colour(label), edgecolor="grey", label=name)
        for label, name in classes.items()
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return _save(figure, path)


# ------------------------------------------------------------------------------- summary


def summarise(records: list[dict], config: dict, card: dict | None) -> dict:
    """The run in numbers, as a JSON-serialisable dict."""
    noise = config.get("noise") or card or {}
    evaluated = [r for r in records if "test_dice" in r]
    rounds = [r for r in records if "cleanse" in r]
    summary = {
        "method": config.get("method"),
        "noise_kind": noise.get("kind"),
        "noise_rate": noise.get("rate"),
        "epochs": len(records),
        "epochs_configured": config.get("train", {}).get("epochs"),
        "final_test_dice": evaluated[-1]["test_dice"] if evaluated else None,
        "final_test_dice_per_class": evaluated[-1]["test_dice_per_class"] if evaluated else None,
        "cleansing_rounds": len(rounds),
        "first_cleansing_epoch": rounds[0]["epoch"] if rounds else None,
    }
    if rounds:
        last = rounds[-1]["cleanse"]
        summary.update(
            last_flagged=last["flagged"],
            detection=last.get("detection"),
            pseudo_label_dice=last.get("pseudo_label_dice"),
        )
        scored = [r for r in rounds if (r["cleanse"].get("detection") or {}).get("auc") is not None]
        if scored:
            best = max(scored, key=lambda r: r["cleanse"]["detection"]["auc"])
            summary["best_detection_auc"] = {
                "epoch": best["epoch"],
                "auc": best["cleanse"]["detection"]["auc"],
            }
    return summary


def _format(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_format(v)}" for key, v in value.items())
    return str(value)


def summary_markdown(summary: dict) -> str:
    """The summary as a two-column markdown table, skipped plots listed below it."""
    rows = {
        "method": summary["method"],
        "noise": f"{_format(summary['noise_kind'])} at rate {_format(summary['noise_rate'])}",
        "epochs": f"{summary['epochs']} of {_format(summary['epochs_configured'])}",
        "final test Dice": summary["final_test_dice"],
        "final test Dice per class": summary["final_test_dice_per_class"],
        "cleansing rounds": summary["cleansing_rounds"],
    }
    if summary["cleansing_rounds"]:
        pseudo = summary["pseudo_label_dice"] or {}
        best = summary.get("best_detection_auc")
        rows.update(
            {
                "flagged in the last round": summary["last_flagged"],
                "detection (last round)": summary["detection"],
                "pseudo-label Dice (last round)": (
                    f"given {_format(pseudo['given'])} → cleansed {_format(pseudo['cleansed'])}"
                    if pseudo
                    else None
                ),
                "best detection AUC": best and f"{best['auc']:.4f} at epoch {best['epoch']}",
            }
        )
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {name} | {_format(value)} |" for name, value in rows.items()]
    if summary["skipped"]:
        lines += ["", "Skipped:", *(f"- {reason}" for reason in summary["skipped"])]
    return "\n".join(lines) + "\n"


FIGURE_TITLES = {
    "curves.png": "Training loss and test Dice",
    "lfm.png": "The cleansing rounds: flags, detection, pseudo-labels",
    "losses.png": "The LFM's view: the GMM input of clean and noisy slices",
    "memorisation.png": "Memorisation: per-slice training losses",
    "overlays.png": "Labels, training targets and predictions",
}


def _markdown_table_html(lines: list[str]) -> str:
    """A pipe table (header, rule, rows) as an HTML table; cells escaped."""
    rows = [
        [html.escape(c.strip()) for c in line.strip().strip("|").split(" | ")] for line in lines
    ]
    header = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows[2:])
    return f"<table><tr>{header}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;"
        "padding:4px 8px;text-align:left}img{max-width:100%}</style></head><body>"
        f"{body}</body></html>\n"
    )


def _embedded(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def index_html(summary: dict, figures: list[Path], run: Path) -> str:
    """One self-contained page: the summary table and every figure, embedded."""
    table = summary_markdown(summary).split("\n\nSkipped:")[0].splitlines()[2:]
    rows = []
    for line in table:
        cells = [html.escape(c.strip()) for c in line.strip("|").split(" | ")]
        rows.append(f"<tr><th>{cells[0]}</th><td>{' | '.join(cells[1:])}</td></tr>")
    sections = [
        f"<h2>{html.escape(FIGURE_TITLES.get(p.name, p.stem))}</h2>{_embedded(p)}" for p in figures
    ]
    skipped = "".join(f"<li>{html.escape(reason)}</li>" for reason in summary["skipped"])
    return _page(
        f"selfcleanse report: {run}",
        f"<h1>Run {html.escape(run.name)}</h1><p>{html.escape(str(run))}</p>"
        f"<table>{''.join(rows)}</table>{''.join(sections)}"
        + (f"<h2>Skipped</h2><ul>{skipped}</ul>" if skipped else ""),
    )


def plot_study(cells: dict[tuple[str, str], dict[str, dict[int, dict]]], path: Path) -> Path:
    """Per (dataset, protocol): each method's test Dice per seed, one line per seed across
    the methods (the pairing), the mean as a black bar."""
    keys = list(cells)
    columns = min(len(keys), 3)
    rows = -(-len(keys) // columns)
    figure = Figure(figsize=(4.6 * columns, 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (dataset, protocol) in zip(axes, keys, strict=False):
        cell = cells[dataset, protocol]
        methods = [m for m in METHODS if m in cell]
        seeds = sorted({s for by_seed in cell.values() for s in by_seed})
        for seed in seeds:
            values = [
                100 * cell[m][seed]["test_dice"] if seed in cell[m] else np.nan for m in methods
            ]
            ax.plot(range(len(methods)), values, "o-", color="grey", alpha=0.6, markersize=4)
        means = [100 * np.mean([r["test_dice"] for r in cell[m].values()]) for m in methods]
        ax.scatter(range(len(methods)), means, marker="_", s=600, color="black", zorder=3)
        ax.set_xticks(range(len(methods)), methods)
        ax.set(ylabel="test Dice (%)", title=f"{dataset} · {protocol}")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    figure.suptitle("Test Dice per seed (grey lines pair a seed's runs; black bars: means)")
    return _save(figure, path)


def study_page(
    results: dict,
    cells: dict[tuple[str, str], dict[str, dict[int, dict]]],
    markdown_text: str,
    output: Path,
) -> Path:
    """`output/index.html` of a study: its tables (`markdown_text`), a figure of every cell
    (`cells`: the rows by (dataset, protocol), method and seed) and links to the runs."""
    figure = plot_study(cells, output / "study.png")
    seconds = results.get("seconds")
    intro = f"{len(results['rows'])} rows, {seconds:.0f} s." if seconds else ""
    figures = {"Test Dice per seed": figure}
    return results_page(f"Study {output.name}", markdown_text, output, figures, intro)


def results_page(
    title: str,
    markdown_text: str,
    output: Path,
    figures: dict[str, Path] | None = None,
    intro: str = "",
) -> Path:
    """`output/index.html`: the tables and paragraphs of `markdown_text`, `figures` (by
    heading) embedded, and links to the page of every run found under `output`; self-contained but
    for those links."""
    blocks, table = [], []
    for line in [*markdown_text.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            blocks.append(_markdown_table_html(table))
            table = []
        if line.startswith("### "):
            blocks.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line:
            blocks.append(f"<p>{html.escape(line)}</p>")
    shown = "".join(
        f"<h2>{html.escape(heading)}</h2>{_embedded(path)}"
        for heading, path in (figures or {}).items()
    )
    pages = sorted(p.relative_to(output) for p in output.glob("**/report/index.html"))
    links = "".join(
        f'<li><a href="{html.escape(str(p))}">{html.escape(str(p.parent.parent))}</a></li>'
        for p in pages
    )
    return atomic.write_text(
        output / "index.html",
        _page(
            f"selfcleanse: {title}",
            f"<h1>{html.escape(title)}</h1>"
            + (f"<p>{html.escape(intro)}</p>" if intro else "")
            + "".join(blocks)
            + shown
            + (f"<h2>Runs</h2><ul>{links}</ul>" if links else ""),
        ),
    )


# ---------------------------------------------------------------------------- entry point


def make_report(workdir: Path, output: Path | None = None, overlays: bool = True) -> dict:
    """Plots and a summary of one training run's work directory; output defaults to
    workdir/'report'. `overlays` False leaves out the one figure that needs the model and
    the data again (tens of seconds on a CPU). Returns {'files': [paths written],
    'summary': {...}}."""
    workdir = Path(workdir)
    records = read_metrics(workdir)
    output = workdir / "report" if output is None else Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = _read_json(workdir / "config.json") or {}
    card = _read_json(workdir / "noise_card.json")
    rounds = [r for r in records if "cleanse" in r]
    files = [plot_curves(records, rounds[0]["epoch"] if rounds else None, output / "curves.png")]
    skipped = []
    if rounds:
        files.append(plot_lfm(rounds, output / "lfm.png"))
    else:
        skipped.append("lfm.png: no cleansing rounds")
    every_epoch = read_dynamics(workdir)
    dynamics = {e: arrays for e, arrays in every_epoch.items() if "lfm_input" in arrays}
    truth = noise_truth(card)
    unknown = {int(i) for arrays in every_epoch.values() for i in arrays["idx"]} - set(truth or {})
    if every_epoch and truth and unknown:
        truth = None
        skipped.append(f"clean/noisy split: noise_card.json has no record of {len(unknown)} slices")
    elif every_epoch and card is None and config.get("noise", {}).get("kind") != "none":
        skipped.append("clean/noisy split: no noise_card.json")
    if every_epoch:
        warmup_end = rounds[0]["epoch"] if rounds else None
        files.append(plot_memorisation(every_epoch, truth, warmup_end, output / "memorisation.png"))
    else:
        skipped.append("memorisation.png: no dynamics files (train.record_dynamics was off)")
    if dynamics:
        gmm_by_epoch = {r["epoch"]: r["cleanse"] for r in rounds}
        files.append(plot_losses(dynamics, truth, gmm_by_epoch, output / "losses.png"))
        if not overlays:
            skipped.append("overlays.png: left out (`selfcleanse report --workdir RUN` draws it)")
        elif (workdir / "checkpoints").is_dir():
            last = dynamics[max(dynamics)]
            files.append(plot_overlays(workdir, last, truth, output / "overlays.png"))
        else:
            skipped.append("overlays.png: no checkpoint (train.checkpoint was off)")
    elif rounds:
        skipped.append("losses.png: no dynamics files (train.record_dynamics was off)")
    else:
        skipped.append("losses.png: no cleansing rounds")
    for stale in set(FIGURE_TITLES) - {path.name for path in files}:
        (output / stale).unlink(missing_ok=True)  # left by an earlier report, no longer true
    summary = {**summarise(records, config, card), "skipped": skipped}
    atomic.write_text(output / "summary.md", summary_markdown(summary))
    atomic.write_text(output / "index.html", index_html(summary, files, workdir))
    files += [output / "summary.md", output / "index.html"]
    return {"files": [str(path) for path in files], "summary": summary}
