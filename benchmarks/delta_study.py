"""The delta grid across sets at a glance: for each delta, AS-Softmax's paired test-accuracy
difference to softmax (mean, 95% interval), the Pearson correlation of its validation loss with
validation accuracy after epoch 1 (softmax's own level dashed), and the training masked ratio at
the end, one line per set; prints the same numbers as a markdown table.

Each argument is a folder of the delta grid (``benchmarks/compare.py ... --out``): its
``journal*.jsonl``, and, where present, the earlier script's ``script_runs/<arm>.runs.jsonl``
(``softmax``, ``as_<delta>``; the same fits, without masked ratios). Arms named
``as_softmax(delta=D)`` are placed at D; ``as_softmax + DeltaWarmup(...)`` (delta 0.1 after a
warm-up from 1.0) is drawn as an open marker beside 0.1::

    python benchmarks/delta_study.py benchmarks/results/delta/* --figure docs/figures/delta_study.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from lightning_assoftmax.compare import read_journals
from lightning_assoftmax.compare.stats import mean_std, paired_difference

BASELINE = "softmax"
TRACKING_KEY = "pearson_val_loss_acc_after_epoch_1"
MASKED_KEY = "final_masked_ratio"
WARMUP = "as_softmax + DeltaWarmup"
_DELTA_ARM = re.compile(r"^as_softmax\(delta=([0-9.]+)\)$")


def read_fits(folder: Path) -> list[dict[str, Any]]:
    """The fits of a delta-grid folder; a journal's fit wins over the earlier script's of the same
    arm and seed."""
    fits = {(f["arm"], f["seed"]): f for f in (read_journals(folder) if list(folder.glob("journal*.jsonl")) else [])}
    for path in sorted(folder.glob("script_runs/*.runs.jsonl")):
        name = path.name.removesuffix(".runs.jsonl")
        arm = BASELINE if name == BASELINE else f"as_softmax(delta={name.removeprefix('as_')})"
        for line in path.read_text().splitlines():
            if line.strip():
                fit = json.loads(line)
                fits.setdefault((arm, fit["seed"]), {**fit, "arm": arm})
    if not fits:
        raise SystemExit(f"delta_study: {folder} holds no journal.jsonl and no script_runs/*.runs.jsonl")
    return list(fits.values())


def set_name(folder: Path, fits: list[dict[str, Any]]) -> str:
    settings = next((f["settings"] for f in fits if isinstance(f.get("settings"), dict) and "data" in f["settings"]), {})
    return str(settings.get("data", folder.name))


def delta_of(arm: str) -> float | None:
    """The arm's delta (the warm-up arm: its final 0.1); None for other arms."""
    match = _DELTA_ARM.match(arm)
    if match:
        return float(match.group(1))
    return 0.1 if arm.startswith(WARMUP) else None


def rows_of(fits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm with a delta (the warm-up arm last): the paired difference to softmax in
    points with its interval, and mean and std of the tracking Pearson and masked ratio."""
    baseline = [f for f in fits if f["arm"] == BASELINE]
    arms = sorted({f["arm"] for f in fits if delta_of(f["arm"]) is not None},
                  key=lambda arm: (arm.startswith(WARMUP), delta_of(arm)))
    rows = []
    for arm in [BASELINE, *arms]:
        mine = [f for f in fits if f["arm"] == arm]
        row: dict[str, Any] = {"arm": arm, "delta": delta_of(arm), "seeds": len(mine), "warmup": arm.startswith(WARMUP)}
        row["acc"] = mean_std([100 * f["test_acc"] for f in mine])
        row["diff"] = paired_difference(mine, baseline, "test_acc") if arm != BASELINE and baseline else None
        row["tracking"] = mean_std([f.get(TRACKING_KEY, math.nan) for f in mine])
        row["masked"] = mean_std([f.get(MASKED_KEY, math.nan) for f in mine])
        rows.append(row)
    return rows


def _cell(mean: float, std: float, scale: float = 1.0, sign: bool = True, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{scale * mean:{'+' if sign else ''}.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if math.isfinite(std) else "")


def table(columns: dict[str, list[dict[str, Any]]]) -> str:
    """Per delta and set: accuracy vs softmax (pp, paired; seeds lower of all), Pearson, masked."""
    header = ["delta"]
    for name in columns:
        header += [f"{name}: acc vs softmax, pp", "Pearson", "masked"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    arms: list[str] = []
    for rows in columns.values():
        arms += [row["arm"] for row in rows if row["arm"] not in arms]
    for arm in arms:
        label = "softmax" if arm == BASELINE else ("0.1 after DeltaWarmup from 1.0" if arm.startswith(WARMUP) else arm[17:-1])
        cells = [label]
        for rows in columns.values():
            row = next((r for r in rows if r["arm"] == arm), None)
            if row is None:
                cells += ["–", "–", "–"]
                continue
            if row["diff"] is None:
                cells.append(f"{row['acc'][0]:.2f} % ({row['seeds']} seeds)")
            else:
                d = row["diff"]
                cells.append(_cell(d["mean"], d["std"], 100) + (f" ({d['losses']}/{d['n']} lower)" if d["n"] else ""))
            cells.append(_cell(*row["tracking"]))
            cells.append(_cell(*row["masked"], sign=False, digits=3).split(" ±")[0])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_figure(columns: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Three panels against delta (log axis), one colour per set. False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    accuracy, tracking, masked = figure.subplots(1, 3, sharex=True)
    for index, (name, rows) in enumerate(columns.items()):
        color = f"C{index % 10}"
        shift = 1 + 0.025 * (index - (len(columns) - 1) / 2)  # sets side by side at each delta
        plain = [r for r in rows if r["delta"] is not None and not r["warmup"]]
        warm = [r for r in rows if r["warmup"]]
        xs = [r["delta"] * shift for r in plain]
        seeds = "/".join(str(s) for s in sorted({r["seeds"] for r in rows}))
        means = [100 * r["diff"]["mean"] for r in plain]
        low = [100 * (r["diff"]["mean"] - r["diff"]["low"]) if math.isfinite(r["diff"]["low"]) else 0 for r in plain]
        high = [100 * (r["diff"]["high"] - r["diff"]["mean"]) if math.isfinite(r["diff"]["high"]) else 0 for r in plain]
        accuracy.errorbar(xs, means, yerr=[low, high], marker="o", markersize=4, capsize=3, color=color,
                          label=f"{name} ({seeds} seeds)")
        tracking.errorbar(xs, [r["tracking"][0] for r in plain], yerr=[r["tracking"][1] for r in plain],
                          marker="o", markersize=4, capsize=3, color=color)
        softmax = next(r for r in rows if r["arm"] == BASELINE)
        if math.isfinite(softmax["tracking"][0]):
            tracking.axhline(softmax["tracking"][0], color=color, linestyle="--", linewidth=1)
        masked_points = [(x, r["masked"][0]) for x, r in zip(xs, plain, strict=True) if math.isfinite(r["masked"][0])]
        if masked_points:
            masked.plot(*zip(*masked_points, strict=True), marker="o", markersize=4, color=color)
        for r in warm:
            x = 0.125 * shift
            d = r["diff"]
            accuracy.errorbar([x], [100 * d["mean"]], yerr=[[100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]],
                              marker="o", markersize=6, capsize=3, color=color, markerfacecolor="white")
            tracking.plot([x], [r["tracking"][0]], marker="o", markersize=6, color=color, markerfacecolor="white")
            if math.isfinite(r["masked"][0]):
                masked.plot([x], [r["masked"][0]], marker="o", markersize=6, color=color, markerfacecolor="white")
    accuracy.axhline(0.0, color="0.3", linewidth=0.8)
    accuracy.set_ylabel("test accuracy - softmax, pp (paired; mean, 95% interval)")
    accuracy.set_title("accuracy against softmax (0 = ties softmax)", fontsize=9)
    tracking.set_ylabel("Pearson(val loss, val acc) after epoch 1")
    tracking.set_title("tracking (-1: the loss follows accuracy; dashed: softmax)", fontsize=9)
    masked.set_ylabel("training masked ratio at the end")
    masked.set_title("training samples masked at the end", fontsize=9)
    deltas = sorted({r["delta"] for rows in columns.values() for r in rows if r["delta"] is not None and not r["warmup"]})
    for axis in (accuracy, tracking, masked):
        axis.set_xscale("log")
        axis.set_xticks(deltas, [f"{d:g}" for d in deltas])
        axis.minorticks_off()
        axis.set_xlabel("delta (open marker: 0.1 after DeltaWarmup from 1.0)")
        axis.grid(color="0.9")
    accuracy.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="delta-grid folders (compare.py --out)")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (.png or .svg)")
    args = parser.parse_args(argv)
    columns = {}
    for folder in args.folders:
        fits = read_fits(folder)
        columns[set_name(folder, fits)] = rows_of(fits)
    text = table(columns)
    print(text)
    if args.figure is not None:
        if write_figure(columns, args.figure):
            print(f"figure: {args.figure}")
        else:
            print("figure: not written (matplotlib is not installed)")
    return text


if __name__ == "__main__":
    main()
