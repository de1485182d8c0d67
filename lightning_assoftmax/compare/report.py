"""The outputs of a comparison: ``fits.csv``, the markdown tables of ``summary.md``, the figure."""

from __future__ import annotations

import csv
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "FITS_CSV_COLUMNS",
    "accuracy_table",
    "correlation_table",
    "environment",
    "paired_lines",
    "write_figure",
    "write_fits_csv",
    "write_sets_figure",
]

FITS_CSV_COLUMNS = (
    "arm",
    "seed",
    "evaluated_on",
    "best_val",
    "best_step",
    "best_epoch",
    "best_seconds",
    "test_acc",
    "test_macro_f1",
    "train_seconds",
    "train_cpu_seconds",
    "optimizer_steps",
    "train_batches",
    "pearson_val_loss_acc",
    "pearson_val_loss_acc_after_epoch_1",
    "pearson_val_ce_loss_acc",
    "pearson_val_ce_loss_acc_after_epoch_1",
    "final_masked_ratio",
    "val_ce_min",
    "val_ce_final",
)


def write_fits_csv(fits: list[dict[str, Any]], path: Path) -> None:
    """One row per fit, the columns of :data:`FITS_CSV_COLUMNS`."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FITS_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for fit in fits:
            writer.writerow({key: fit.get(key, "") for key in FITS_CSV_COLUMNS})


# -- cells -------------------------------------------------------------------------------------
def percent(mean: float, std: float = math.nan) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if math.isfinite(std) else "")


def signed(mean: float, std: float = math.nan) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:+.2f}" + (f" ± {std:.2f}" if math.isfinite(std) else "")


def plain(mean: float, std: float = math.nan, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "n/a"


def p_value(p: float) -> str:
    return f"{p:.2g}" if math.isfinite(p) else "n/a"


def difference(row: dict[str, Any], key: str = "test_acc", interval: bool = True) -> str:
    """``+0.41 ± 0.30 [+0.04, +0.78]``: the paired difference to the baseline in percentage
    points, its standard deviation over seeds and its 95% interval; ``0`` for the baseline."""
    diff = row.get(f"{key}_minus_baseline")
    if row.get("baseline"):
        return "0 (baseline)"
    if diff is None or not math.isfinite(diff["mean"]):
        return "n/a"
    text = f"{100 * diff['mean']:+.2f}" + (f" ± {100 * diff['std']:.2f}" if math.isfinite(diff["std"]) else "")
    if interval and math.isfinite(diff["low"]):
        text += f" [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]"
    return text


def _monitor_cell(row: dict[str, Any], monitor: str) -> str:
    if monitor.endswith("acc"):
        return percent(row["best_val"], row["best_val_std"])
    return plain(row["best_val"], row["best_val_std"])


def accuracy_table(rows: list[dict[str, Any]], monitor: str = "val/acc", split: str = "test") -> str:
    """The main table: one line per arm."""
    monitor_header = f"best {monitor}" + (" %" if monitor.endswith("acc") else "")
    header = [
        "arm",
        "seeds",
        monitor_header,
        f"{split} acc %",
        f"{split} macro-F1 %",
        f"{split} acc - baseline, pp [95% CI]",
        "p",
        "p (Holm)",
        "time to best vs baseline",
        "train time vs baseline",
        "optimizer steps",
        "train batches",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        diff = row.get("test_acc_minus_baseline") or {}
        baseline = row.get("baseline")
        cells = [
            row["arm"],
            str(row["seeds"]),
            _monitor_cell(row, monitor),
            percent(row["test_acc"], row["test_acc_std"]),
            percent(row["test_macro_f1"], row["test_macro_f1_std"]),
            difference(row),
            "" if baseline else p_value(diff.get("p", math.nan)),
            "" if baseline else p_value(diff.get("p_holm", math.nan)),
            ratio(row["best_seconds_vs_baseline"]),
            ratio(row["train_seconds_vs_baseline"]),
            f"{row['optimizer_steps']:.0f}",
            f"{row['train_batches']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlation_table(rows: list[dict[str, Any]]) -> str:
    """Loss vs accuracy over each fit's validation runs, and the validation cross entropy."""
    columns = [
        ("Pearson(val loss, acc)", "pearson_val_loss_acc"),
        ("after epoch 1", "pearson_val_loss_acc_after_epoch_1"),
        ("Pearson(val CE, acc)", "pearson_val_ce_loss_acc"),
        ("after epoch 1", "pearson_val_ce_loss_acc_after_epoch_1"),
    ]
    header = ["arm", *(name for name, _ in columns), "val CE at its min", "val CE at the end", "final masked ratio"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["arm"], *(signed(row[key], row[f"{key}_std"]) for _, key in columns)]
        cells += [
            plain(row["val_ce_min"], row["val_ce_min_std"], 3),
            plain(row["val_ce_final"], row["val_ce_final_std"], 3),
            plain(row["final_masked_ratio"], row["final_masked_ratio_std"], 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_lines(rows: list[dict[str, Any]], split: str = "test") -> str:
    """One line per arm: its per-seed differences to the baseline."""
    lines = []
    for row in rows:
        diff = row.get("test_acc_minus_baseline")
        if row.get("baseline") or not diff or not diff["per_seed"]:
            continue
        per_seed = ", ".join(f"{100 * d:+.2f}" for d in diff["per_seed"])
        lines.append(
            f"- {row['arm']}: {split} acc - baseline per seed (pp): {per_seed} ({diff['wins']} higher, "
            f"{diff['ties']} equal, {diff['losses']} lower)"
        )
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """Versions and the machine, for the summary."""
    import lightning
    import torch

    import lightning_assoftmax

    device = "CPU"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "lightning_assoftmax": lightning_assoftmax.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "device": device,
    }


# -- figures -----------------------------------------------------------------------------------
def _errorbar_row(axis, rows: list[dict[str, Any]], positions: dict[str, float], color: str, label: str | None) -> None:
    xs, ys, lower, upper = [], [], [], []
    for row in rows:
        diff = row.get("test_acc_minus_baseline")
        if row.get("baseline") or not diff or not math.isfinite(diff["mean"]) or row["arm"] not in positions:
            continue
        mean = 100 * diff["mean"]
        low = 100 * diff["low"] if math.isfinite(diff["low"]) else mean
        high = 100 * diff["high"] if math.isfinite(diff["high"]) else mean
        xs.append(mean)
        ys.append(positions[row["arm"]])
        lower.append(mean - low)
        upper.append(high - mean)
    if xs:
        axis.errorbar(xs, ys, xerr=[lower, upper], fmt="o", markersize=4, capsize=3, color=color, label=label)


def write_figure(
    rows: list[dict[str, Any]], fits: list[dict[str, Any]], path: Path, monitor: str = "val/acc", split: str = "test"
) -> bool:
    """Left: each arm's paired difference to the baseline (mean, 95% interval); right: the mean
    validation curve (``monitor`` over epochs) of each arm. False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    arms = [row["arm"] for row in rows]
    figure = Figure(figsize=(12, 0.45 * len(arms) + 2.2), layout="constrained")
    differences, curves = figure.subplots(1, 2)
    positions = {arm: float(i) for i, arm in enumerate(arms)}
    _errorbar_row(differences, rows, positions, "C0", None)
    differences.axvline(0.0, color="0.4", linewidth=0.8)
    differences.set_yticks(range(len(arms)), arms, fontsize=8)
    differences.set_ylim(len(arms) - 0.5, -0.5)
    differences.set_xlabel(f"{split} accuracy - baseline, pp (paired by seed; mean, 95% interval)")
    differences.set_title(f"against the baseline {arms[0]}", fontsize=9)
    differences.grid(axis="x", color="0.9")
    for index, arm in enumerate(arms):
        mine = [fit["validation_runs"] for fit in fits if fit["arm"] == arm and fit.get("validation_runs")]
        if not mine:
            continue
        length = min(len(points) for points in mine)
        epochs = [mine[0][i]["epoch"] for i in range(length)]
        values = [statistics.fmean(points[i]["monitor"] for points in mine) for i in range(length)]
        scale = 100.0 if monitor.endswith("acc") else 1.0
        curves.plot(epochs, [scale * v for v in values], marker=".", color=f"C{index % 10}", label=arm)
    curves.set_xlabel("epoch")
    curves.set_ylabel(f"{monitor}{' %' if monitor.endswith('acc') else ''} (mean over seeds)")
    curves.legend(fontsize=7)
    curves.grid(color="0.9")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def write_sets_figure(
    columns: dict[str, list[dict[str, Any]]],
    path: Path,
    tracking_key: str = "pearson_val_loss_acc_after_epoch_1",
    low_pp: float = -8.0,
) -> bool:
    """Several grids (``columns``: name -> summary rows, arms named alike) in one figure: the
    paired difference to the baseline with its 95% interval (left) and ``tracking_key`` (right),
    one colour per grid. A difference below ``low_pp`` is drawn at the panel's edge with its value
    written next to it. False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    arms: list[str] = []
    for rows in columns.values():
        arms.extend(row["arm"] for row in rows if row["arm"] not in arms)
    figure = Figure(figsize=(12, 0.42 * len(arms) + 1.8), layout="constrained")
    difference, tracking = figure.subplots(1, 2, sharey=True)
    spread = 0.7 / max(len(columns), 1)
    for index, (name, rows) in enumerate(columns.items()):
        offset = (index - (len(columns) - 1) / 2) * spread
        positions = {arm: i + offset for i, arm in enumerate(arms)}
        color = f"C{index % 10}"
        kept = []
        for row in rows:
            diff = row.get("test_acc_minus_baseline")
            if diff and not row.get("baseline") and math.isfinite(diff["mean"]) and 100 * diff["mean"] < low_pp:
                y = positions[row["arm"]]
                difference.plot([low_pp], [y], marker="<", color=color)
                difference.annotate(
                    f"{100 * diff['mean']:+.0f}", (low_pp, y), xytext=(6 + 16 * index, -3),
                    textcoords="offset points", fontsize=7, color=color,
                )
            else:
                kept.append(row)
        seeds = "/".join(str(c) for c in sorted({row["seeds"] for row in rows}))
        _errorbar_row(difference, kept, positions, color, f"{name} ({seeds} seeds)")
        xs, ys, errors = [], [], []
        for row in rows:
            mean, std = row.get(tracking_key, math.nan), row.get(f"{tracking_key}_std", math.nan)
            if math.isfinite(mean):
                xs.append(mean)
                ys.append(positions[row["arm"]])
                errors.append(std if math.isfinite(std) else 0.0)
        if xs:
            tracking.errorbar(xs, ys, xerr=errors, fmt="o", markersize=4, capsize=2, color=color)
    difference.axvline(0.0, color="0.4", linewidth=0.8)
    if difference.get_xlim()[0] < low_pp - 0.5:
        difference.set_xlim(left=low_pp - 0.5)
    difference.set_xlabel("test accuracy - baseline, pp (paired by seed; mean, 95% interval)")
    difference.set_title("test accuracy against the baseline", fontsize=9)
    tracking.axvline(-1.0, color="0.4", linewidth=0.8, linestyle=":")
    tracking.axvline(0.0, color="0.4", linewidth=0.8)
    tracking.set_xlabel("Pearson(validation loss, validation accuracy) after epoch 1 (mean ± std)")
    tracking.set_title("does the loss track accuracy? (-1: perfectly)", fontsize=9)
    difference.set_yticks(range(len(arms)), arms, fontsize=8)
    difference.set_ylim(len(arms) - 0.5, -0.5)
    for axis in (difference, tracking):
        axis.grid(axis="x", color="0.9")
    difference.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True
