"""Several ``compare.py`` grids side by side: each loss's paired test-accuracy difference to softmax
on every set, and how well its validation loss tracks validation accuracy after the first epoch.

Each argument is a folder that ``compare.py --out`` wrote (its ``runs.jsonl``, one line per finished
fit). Folders of the same set and settings, such as a grid split over processes with
``--first-seed``, or new losses run next to the softmax baseline again, are merged into one column;
a (configuration, seed) fit found twice counts once when both copies agree, and is an error when
they do not.
Prints two markdown tables (sets as columns) and, with ``--figure``, draws both as one figure
(matplotlib, extra ``plot``)::

    python benchmarks/compare_sets.py runs/bag_CLINC150 runs/bag_Banking77 runs/bag_HWU64 \\
        runs/bag_DBpedia219 --figure runs/sets.png

The numbers are those of each grid's own ``results.md`` (the same ``summarize``); this script only
lays them out across sets.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

_COMPARE = Path(__file__).resolve().with_name("compare.py")
_spec = importlib.util.spec_from_file_location("_compare_for_sets", _COMPARE)
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare
_spec.loader.exec_module(compare)

#: The accuracy panel's left edge (pp): a loss that does not train (tens of points below softmax)
#: is drawn at the edge with its value written next to it, so that the others stay readable.
FIGURE_LOW_PP = -8.0
#: The correlation the second table and panel show: the loss's own validation loss (for softmax,
#: the cross entropy) against validation accuracy, over the validation runs after epoch 1.
TRACKING_KEY = "pearson_val_loss_acc_after_epoch_1"
# What must agree for a fit found in two folders to count as one.
_SAME_FIT = ("best_val_acc", "test_acc", "optimizer_steps")


def read_journal(folder: Path) -> list[dict[str, Any]]:
    """The fits of ``folder/runs.jsonl``; a clear error when there is none."""
    journal = folder / "runs.jsonl"
    if not journal.is_file():
        raise SystemExit(f"compare_sets: {journal} does not exist; give folders written by compare.py --out")
    runs = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    if not runs:
        raise SystemExit(f"compare_sets: {journal} holds no finished fit yet")
    return runs


def column_name(settings: dict[str, Any]) -> str:
    return settings["data"] + (" (MiniLM)" if settings.get("backbone") else "")


def merge_columns(folders: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Fits per column (set, and ``(MiniLM)`` with ``--backbone``), in the order first given."""
    columns: dict[str, list[dict[str, Any]]] = {}
    kept_settings: dict[str, tuple[dict[str, Any], Path]] = {}
    sources: dict[tuple[str, str, int], tuple[Path, dict[str, Any]]] = {}
    for folder in folders:
        for run in read_journal(folder):
            settings = run.get("settings", {})
            name = column_name(settings)
            fixed = compare.fixed_settings(settings)
            first = kept_settings.setdefault(name, (fixed, folder))
            if first[0] != fixed:
                raise SystemExit(
                    f"compare_sets: {folder} and {first[1]} both hold {name} fits, with different settings "
                    f"({fixed} against {first[0]}); give only one of them"
                )
            key = (name, run["config"], run["seed"])
            if key in sources:
                # The same fit run again (a baseline repeated next to new losses) is kept once; the
                # fits are seeded, so a rerun with other results means other code or settings.
                earlier = sources[key]
                if any(earlier[1][k] != run[k] for k in _SAME_FIT):
                    raise SystemExit(
                        f"compare_sets: the {run['config']} fit of seed {run['seed']} on {name} is in both "
                        f"{earlier[0]} and {folder}, with different results (test acc "
                        f"{earlier[1]['test_acc']} against {run['test_acc']}); give only one of them"
                    )
                continue
            sources[key] = (folder, run)
            columns.setdefault(name, []).append({k: v for k, v in run.items() if k != "settings"})
    return columns


def summarize_columns(columns: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """The configurations (``build_loss`` order, AS-Speed and the annealed margin losses each
    after the loss it trains, then any other) and, per column, the rows of ``compare.summarize``
    by configuration."""
    present = {run["config"] for runs in columns.values() for run in runs}
    variants = {compare.AS_SPEED: "as_softmax", **compare.ANNEALED}
    known = [
        name
        for base in compare.LOSS_NAMES
        for name in (base, *(extra for extra, loss in variants.items() if loss == base))
    ]
    order = [c for c in known if c in present] + sorted(present - set(known))
    table = {name: {row["config"]: row for row in compare.summarize(runs, order)} for name, runs in columns.items()}
    return order, table


def _labels(order: list[str], table: dict[str, dict[str, dict]]) -> dict[str, str]:
    labels = {}
    for config in order:
        labels[config] = next(rows[config]["label"] for rows in table.values() if config in rows)
    return labels


def _seeds(rows: dict[str, dict]) -> str:
    counts = sorted({row["seeds"] for row in rows.values()})
    return "/".join(str(c) for c in counts)


def accuracy_table(order: list[str], table: dict[str, dict[str, dict]]) -> str:
    """Softmax's test accuracy, then each loss's paired difference to it (pp), one column per set."""
    labels = _labels(order, table)
    header = ["loss", *(f"{name} ({_seeds(rows)} seeds)" for name, rows in table.items())]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for config in order:
        cells = [labels[config] + (" (test acc %)" if config == compare.BASELINE else "")]
        for rows in table.values():
            row = rows.get(config)
            if row is None:
                cells.append("–")
            elif config == compare.BASELINE:
                cells.append(compare._percent(row["test_acc"], row["test_acc_std"]))
            else:
                cells.append(compare._difference(row, "test_acc"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tracking_table(order: list[str], table: dict[str, dict[str, dict]]) -> str:
    """Pearson of each loss's validation loss against validation accuracy after epoch 1."""
    labels = _labels(order, table)
    header = ["loss", *table]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for config in order:
        cells = [labels[config]]
        for rows in table.values():
            row = rows.get(config)
            cells.append("–" if row is None else compare._signed(row[TRACKING_KEY], row[f"{TRACKING_KEY}_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_figure(order: list[str], table: dict[str, dict[str, dict]], path: Path) -> bool:
    """Two panels sharing the loss axis: the paired difference to softmax (mean ± std over seeds)
    and the loss/accuracy Pearson after epoch 1; one marker colour per set. False without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    labels = _labels(order, table)
    figure = Figure(figsize=(12, 0.42 * len(order) + 1.8), layout="constrained")
    difference, tracking = figure.subplots(1, 2, sharey=True)
    names = list(table)
    spread = 0.7 / max(len(names), 1)
    for index, name in enumerate(names):
        offset = (index - (len(names) - 1) / 2) * spread
        for axis, kind in ((difference, "difference"), (tracking, "tracking")):
            ys, xs, errors = [], [], []
            for position, config in enumerate(order):
                row = table[name].get(config)
                if row is None:
                    continue
                if kind == "difference":
                    diff = row.get("test_acc_minus_softmax")
                    if config == compare.BASELINE or not diff or not math.isfinite(diff["mean"]):
                        continue
                    mean, std = 100 * diff["mean"], 100 * diff["std"]
                else:
                    mean, std = row[TRACKING_KEY], row[f"{TRACKING_KEY}_std"]
                    if not math.isfinite(mean):
                        continue
                if kind == "difference" and mean < FIGURE_LOW_PP:
                    axis.plot([FIGURE_LOW_PP], [position + offset], marker="<", color=f"C{index}")
                    axis.annotate(
                        f"{mean:+.0f}", (FIGURE_LOW_PP, position + offset), xytext=(6 + 16 * index, -3),
                        textcoords="offset points", fontsize=7, color=f"C{index}",
                    )
                    continue
                ys.append(position + offset)
                xs.append(mean)
                errors.append(std if math.isfinite(std) else 0.0)
            axis.errorbar(
                xs, ys, xerr=errors, fmt="o", markersize=4, capsize=2, color=f"C{index}",
                label=f"{name} ({_seeds(table[name])} seeds)",
            )
    difference.axvline(0.0, color="0.4", linewidth=0.8)
    if difference.get_xlim()[0] < FIGURE_LOW_PP - 0.5:
        difference.set_xlim(left=FIGURE_LOW_PP - 0.5)
    difference.set_xlabel("test accuracy - softmax, pp (paired by seed; mean ± std)")
    difference.set_title("test accuracy against softmax (0: softmax itself)", fontsize=9)
    tracking.axvline(-1.0, color="0.4", linewidth=0.8, linestyle=":")
    tracking.axvline(0.0, color="0.4", linewidth=0.8)
    tracking.set_xlabel("Pearson(validation loss, validation accuracy) after epoch 1")
    tracking.set_title("does the loss track accuracy? (-1: perfectly)", fontsize=9)
    difference.set_yticks(range(len(order)), [labels[c] for c in order], fontsize=8)
    difference.invert_yaxis()
    for axis in (difference, tracking):
        axis.grid(axis="x", color="0.9")
    difference.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders written by compare.py --out")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (a .png or .svg path)")
    args = parser.parse_args(argv)
    order, table = summarize_columns(merge_columns(args.folders))
    report = (
        "Test accuracy: softmax's (mean ± std over seeds), then each loss's difference to it in "
        "percentage points, paired by seed (paired t-test p).\n\n"
        f"{accuracy_table(order, table)}\n\n"
        "Pearson correlation of each loss's validation loss with validation accuracy over the "
        "validation runs after epoch 1 (mean ± std over seeds; -1: the loss tracks accuracy).\n\n"
        f"{tracking_table(order, table)}\n"
    )
    print(report, end="")
    if args.figure is not None:
        if write_figure(order, table, args.figure):
            print(f"\nfigure written to {args.figure}")
        else:
            print("\nno figure: matplotlib is not installed (pip install 'lightning-assoftmax[plot]')")
    return report


if __name__ == "__main__":
    main()
