"""Statistics of a comparison: per-arm means, differences paired by seed, Holm's adjustment.

Pure Python on the per-fit records (dicts with ``arm``, ``seed`` and the measured values); the
Student t distribution comes from ``scipy.stats`` (installed with the ``cli`` extra).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "correlation",
    "holm",
    "mean_std",
    "paired_difference",
    "paired_ratio",
    "summarize",
]

#: The per-fit values summarized as mean ± std, and those compared with the baseline by seed.
MEAN_STD_KEYS = (
    "best_val",
    "test_acc",
    "test_macro_f1",
    "pearson_val_loss_acc",
    "pearson_val_loss_acc_after_epoch_1",
    "pearson_val_ce_loss_acc",
    "pearson_val_ce_loss_acc_after_epoch_1",
    "spearman_val_loss_acc",
    "spearman_val_loss_acc_after_epoch_1",
    "spearman_val_ce_loss_acc",
    "spearman_val_ce_loss_acc_after_epoch_1",
    "final_masked_ratio",
    "val_ce_min",
    "val_ce_final",
)
PAIRED_KEYS = ("test_acc", "test_macro_f1", "best_val")
RATIO_KEYS = ("best_seconds", "train_seconds", "train_cpu_seconds")
MEAN_KEYS = ("optimizer_steps", "train_batches", "best_seconds", "train_seconds", "train_cpu_seconds")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; NaN where undefined."""
    kept = _finite(values)
    mean = statistics.fmean(kept) if kept else math.nan
    std = statistics.stdev(kept) if len(kept) >= 2 else math.nan
    return mean, std


def paired_ratio(fits: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str) -> float:
    """Median over seeds of ``fit[key] / baseline fit[key]`` (same seed; seeds both have)."""
    by_seed = {fit["seed"]: fit.get(key, math.nan) for fit in baseline}
    ratios = [
        fit.get(key, math.nan) / by_seed[fit["seed"]]
        for fit in fits
        if isinstance(by_seed.get(fit["seed"]), (int, float)) and by_seed[fit["seed"]] > 0
    ]
    ratios = _finite(ratios)
    return statistics.median(ratios) if ratios else math.nan


def paired_difference(
    fits: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str, confidence: float = 0.95
) -> dict[str, Any]:
    """``fit[key] - baseline fit[key]`` per seed (the seeds both have), with a paired t-test.

    Returns ``seeds``, ``per_seed``, ``n``, ``mean``, ``std`` (sample), the two-sided paired
    t-test ``t`` and ``p`` (``df = n - 1``), the ``confidence`` interval of the mean difference
    ``low``, ``high`` (``mean ± t_{(1+c)/2, n-1} std / sqrt(n)``; NaN with fewer than 2 seeds; with
    no spread the interval is the mean itself, ``p`` 0 for a nonzero and 1 for a zero difference) and ``wins`` / ``ties`` / ``losses`` (seeds above / equal to / below the baseline).
    """
    by_seed = {fit["seed"]: fit.get(key, math.nan) for fit in baseline}
    mine = {fit["seed"]: fit.get(key, math.nan) for fit in fits}
    seeds = sorted(s for s in mine if s in by_seed and _finite([mine[s], by_seed[s]]) == [mine[s], by_seed[s]])
    differences = [mine[s] - by_seed[s] for s in seeds]
    mean, std = mean_std(differences)
    n = len(differences)
    t = p = low = high = math.nan
    if n >= 2 and math.isfinite(std) and std > 0:
        from scipy.stats import t as student_t

        sem = std / math.sqrt(n)
        t = mean / sem
        p = float(2 * student_t.sf(abs(t), df=n - 1))
        half = float(student_t.ppf((1 + confidence) / 2, df=n - 1)) * sem
        low, high = mean - half, mean + half
    elif n >= 2 and std == 0:
        # Every seed moved by the same amount: no spread to test against. A nonzero shift is
        # as certain as these seeds can make it (t infinite), no shift at all is no evidence.
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if mean else 1.0
        low = high = mean
    return {
        "seeds": seeds,
        "per_seed": differences,
        "n": n,
        "mean": mean,
        "std": std,
        "t": t,
        "p": p,
        "low": low,
        "high": high,
        "wins": sum(d > 0 for d in differences),
        "ties": sum(d == 0 for d in differences),
        "losses": sum(d < 0 for d in differences),
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``m`` p-values (family-wise error), in the given order.

    Sorted ascending, the ``i``-th (from 0) becomes ``max_{j <= i} min(1, (m - j) p_(j))``; NaN
    entries stay NaN and do not count in ``m``.
    """
    order = sorted((p, i) for i, p in enumerate(p_values) if isinstance(p, (int, float)) and math.isfinite(p))
    m = len(order)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def correlation(
    points: list[dict[str, float]],
    loss_key: str = "loss",
    method: str = "pearson",
    after_epoch: float = 0.0,
) -> float:
    """Correlation (``pearson`` or ``spearman``, float64) of ``point[loss_key]`` with
    ``point["acc"]`` over the validation runs after ``after_epoch`` epochs (0: all); NaN with
    fewer than 3 runs, a missing value or a constant series.

    Over a whole fit the first validation runs (high loss, low accuracy) decide the value;
    ``after_epoch=1`` asks whether the loss still tracks accuracy once training has settled.
    """
    from torchmetrics.functional.regression import pearson_corrcoef, spearman_corrcoef

    kept = [p for p in points if p["epoch"] > after_epoch + 1e-9]
    if len(kept) < 3:
        return math.nan
    loss = torch.tensor([p.get(loss_key, math.nan) for p in kept], dtype=torch.float64)
    acc = torch.tensor([p.get("acc", math.nan) for p in kept], dtype=torch.float64)
    if not (torch.isfinite(loss).all() and torch.isfinite(acc).all() and loss.std() > 0 and acc.std() > 0):
        return math.nan
    function = {"pearson": pearson_corrcoef, "spearman": spearman_corrcoef}[method]
    return float(function(loss, acc))


def summarize(fits: list[dict[str, Any]], arms: list[str]) -> list[dict[str, Any]]:
    """One row per arm (in ``arms`` order, the first the baseline; arms without fits left out).

    A row holds ``arm``, ``seeds``, ``<key>`` and ``<key>_std`` for :data:`MEAN_STD_KEYS`, the
    means of :data:`MEAN_KEYS`, ``<key>_vs_baseline`` (median per-seed ratio) for
    :data:`RATIO_KEYS`, and ``<key>_minus_baseline`` (:func:`paired_difference`, with
    ``p_holm``: Holm-adjusted over the other arms) for :data:`PAIRED_KEYS`.
    """
    baseline = [f for f in fits if f["arm"] == arms[0]]
    rows = []
    for arm in arms:
        mine = [f for f in fits if f["arm"] == arm]
        if not mine:
            continue
        row: dict[str, Any] = {"arm": arm, "seeds": len(mine), "baseline": arm == arms[0]}
        for key in MEAN_STD_KEYS:
            row[key], row[f"{key}_std"] = mean_std([f.get(key, math.nan) for f in mine])
        for key in MEAN_KEYS:
            row[key] = mean_std([f.get(key, math.nan) for f in mine])[0]
        for key in RATIO_KEYS:
            row[f"{key}_vs_baseline"] = paired_ratio(mine, baseline, key) if baseline else math.nan
        for key in PAIRED_KEYS:
            row[f"{key}_minus_baseline"] = paired_difference(mine, baseline, key) if baseline else None
        rows.append(row)
    for key in PAIRED_KEYS:
        others = [r for r in rows if not r["baseline"] and r[f"{key}_minus_baseline"] is not None]
        for row, p in zip(others, holm([r[f"{key}_minus_baseline"]["p"] for r in others]), strict=True):
            row[f"{key}_minus_baseline"]["p_holm"] = p
    return rows
