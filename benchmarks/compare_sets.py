"""Several ``compare.py`` grids side by side: each loss's paired test-accuracy difference to softmax
on every set, and how well its validation loss tracks validation accuracy after the first epoch.

Each argument is a folder that ``compare.py --out`` (or ``lightning-assoftmax compare --out``)
wrote. Folders of the same set and settings, such as new losses run next to the softmax
baseline again or the shards of one grid, are merged into one column; a fit found twice counts
once when both copies agree, and is an error when they do not. The statistics, tables' cells and
the figure are the package's (``lightning_assoftmax.compare``); this script only lays the grids
out across sets::

    python benchmarks/compare_sets.py runs/bag_CLINC150 runs/bag_Banking77 runs/bag_HWU64 \\
        runs/bag_DBpedia219 --figure runs/sets.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lightning_assoftmax.compare import read_journals, summarize
from lightning_assoftmax.compare.grid import SAME_FIT
from lightning_assoftmax.compare.report import (
    difference,
    p_value,
    percent,
    signed,
    write_sets_figure,
)
from lightning_assoftmax.family import LOSS_NAMES

BASELINE = "softmax"
#: The accuracy panel's left edge (pp): a loss that does not train (tens of points below softmax)
#: is drawn at the edge with its value written next to it, so that the others stay readable.
FIGURE_LOW_PP = -8.0
#: The correlation the second table and panel show: the loss's own validation loss (for softmax,
#: the cross entropy) against validation accuracy, over the validation runs after epoch 1.
TRACKING_KEY = "pearson_val_loss_acc_after_epoch_1"


def read_folder(folder: Path) -> list[dict[str, Any]]:
    """The fits of a grid's folder; a clear error when it holds none."""
    if not folder.is_dir() or not list(folder.glob("journal*.jsonl")):
        raise SystemExit(f"compare_sets: {folder} holds no journal.jsonl; give folders written by compare.py --out")
    try:
        fits = read_journals(folder)
    except ValueError as error:
        raise SystemExit(f"compare_sets: {error}") from None
    if not fits:
        raise SystemExit(f"compare_sets: {folder} holds no finished fit yet")
    return fits


def column_name(settings: dict[str, Any]) -> str:
    return settings["data"] + (" (MiniLM)" if settings.get("backbone") else "")


def merge_columns(folders: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Fits per column (set, and ``(MiniLM)`` with ``--backbone``), in the order first given."""
    columns: dict[str, list[dict[str, Any]]] = {}
    kept_settings: dict[str, tuple[dict[str, Any], Path]] = {}
    sources: dict[tuple[str, str, int], tuple[Path, dict[str, Any]]] = {}
    for folder in folders:
        for fit in read_folder(folder):
            settings = fit.get("settings", {})
            name = column_name(settings)
            first = kept_settings.setdefault(name, (settings, folder))
            if first[0] != settings:
                changed = sorted(k for k in set(settings) | set(first[0]) if settings.get(k) != first[0].get(k))
                raise SystemExit(
                    f"compare_sets: {folder} and {first[1]} both hold {name} fits, with different settings "
                    f"({', '.join(f'{k}: {settings.get(k)!r} against {first[0].get(k)!r}' for k in changed)}); "
                    "give only one of them"
                )
            key = (name, fit["arm"], fit["seed"])
            if key in sources:
                # The same fit run again (a baseline repeated next to new losses) is kept once; the
                # fits are seeded, so a rerun with other results means other code or settings.
                earlier = sources[key]
                if any(earlier[1].get(k) != fit.get(k) for k in SAME_FIT):
                    raise SystemExit(
                        f"compare_sets: the {fit['arm']} fit of seed {fit['seed']} on {name} is in both "
                        f"{earlier[0]} and {folder}, with different results (test acc "
                        f"{earlier[1]['test_acc']} against {fit['test_acc']}); give only one of them"
                    )
                continue
            sources[key] = (folder, fit)
            columns.setdefault(name, []).append(fit)
    return columns


def arm_order(columns: dict[str, list[dict[str, Any]]]) -> list[str]:
    """softmax first, then ``build_loss`` order, each loss's plain arm before its variants."""
    arms = {fit["arm"]: fit for fits in columns.values() for fit in fits}

    def rank(key: str) -> tuple:
        loss = arms[key].get("loss", key)
        position = LOSS_NAMES.index(loss) if loss in LOSS_NAMES else len(LOSS_NAMES)
        return (key != BASELINE, position, key != loss, key)

    return sorted(arms, key=rank)


def summarize_columns(columns: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """The arms and, per column, the package's summary rows by arm (softmax the baseline)."""
    order = arm_order(columns)
    table = {name: {row["arm"]: row for row in summarize(fits, order)} for name, fits in columns.items()}
    return order, table


def _seeds(rows: dict[str, dict]) -> str:
    return "/".join(str(c) for c in sorted({row["seeds"] for row in rows.values()}))


def accuracy_table(order: list[str], table: dict[str, dict[str, dict]]) -> str:
    """Softmax's test accuracy, then each arm's paired difference to it (pp), one column per set."""
    header = ["arm", *(f"{name} ({_seeds(rows)} seeds)" for name, rows in table.items())]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for arm in order:
        cells = [arm + (" (test acc %)" if arm == BASELINE else "")]
        for rows in table.values():
            row = rows.get(arm)
            if row is None:
                cells.append("–")
            elif arm == BASELINE:
                cells.append(percent(row["test_acc"], row["test_acc_std"]))
            else:
                diff = row["test_acc_minus_baseline"]
                p = diff["p"] if diff else math.nan
                text = difference(row, interval=False)
                cells.append(text + (f" (p {p_value(p)})" if math.isfinite(p) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tracking_table(order: list[str], table: dict[str, dict[str, dict]]) -> str:
    """Pearson of each arm's validation loss against validation accuracy after epoch 1."""
    header = ["arm", *table]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for arm in order:
        cells = [arm]
        for rows in table.values():
            row = rows.get(arm)
            cells.append("–" if row is None else signed(row[TRACKING_KEY], row[f"{TRACKING_KEY}_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders written by compare.py --out")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (a .png or .svg path)")
    args = parser.parse_args(argv)
    order, table = summarize_columns(merge_columns(args.folders))
    report = (
        "Test accuracy: softmax's (mean ± std over seeds), then each arm's difference to it in "
        "percentage points, paired by seed (paired t-test p, not adjusted).\n\n"
        f"{accuracy_table(order, table)}\n\n"
        "Pearson correlation of each arm's validation loss with validation accuracy over the "
        "validation runs after epoch 1 (mean ± std over seeds; -1: the loss tracks accuracy).\n\n"
        f"{tracking_table(order, table)}\n"
    )
    print(report, end="")
    if args.figure is not None:
        rows = {name: [rows[arm] for arm in order if arm in rows] for name, rows in table.items()}
        if write_sets_figure(rows, args.figure, TRACKING_KEY, FIGURE_LOW_PP):
            print(f"\nfigure written to {args.figure}")
        else:
            print("\nno figure: matplotlib is not installed (pip install 'lightning-assoftmax[plot]')")
    return report


if __name__ == "__main__":
    main()
