"""benchmarks/as_speed.py: its aggregation against hand-computed figures, and a smoke run (--quick)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import benchmark_module


@pytest.fixture(scope="module")
def as_speed():
    yield from benchmark_module("as_speed")


def fake_run(arm, seed, accs, seconds, batches, test_acc=0.9):
    points = [
        {"batches": b, "seconds": s, "cpu_seconds": s / 2, "acc": a}
        for a, s, b in zip(accs, seconds, batches, strict=True)
    ]
    return {
        "arm": arm, "label": arm, "seed": seed, "batches": batches[-1], "optimizer_steps": batches[-1],
        "train_seconds": seconds[-1] + 1.0, "train_cpu_seconds": (seconds[-1] + 1.0) / 2,
        "validation_runs": points, "best_val_acc": max(accs), "test_acc": test_acc, "test_macro_f1": test_acc - 0.01,
    }


def test_time_to_target_and_ratios_by_hand(as_speed):
    runs = [
        # seed 0: softmax best 0.95 -> target 0.945; skip reaches it at 3 s (softmax at 8 s)
        fake_run("softmax", 0, [0.90, 0.946, 0.95], [4.0, 8.0, 12.0], [10, 20, 30]),
        fake_run("as_skip", 0, [0.93, 0.945, 0.96], [2.0, 3.0, 5.0], [10, 15, 18]),
        # seed 1: softmax best 0.90 -> target 0.895; skip never gets there
        fake_run("softmax", 1, [0.90, 0.85], [5.0, 10.0], [10, 20]),
        fake_run("as_skip", 1, [0.80, 0.89], [2.0, 4.0], [10, 14]),
        # seed 2: softmax reaches its target at 6 s, skip at 2 s
        fake_run("softmax", 2, [0.97, 0.97], [6.0, 12.0], [10, 20]),
        fake_run("as_skip", 2, [0.966, 0.97], [2.0, 4.0], [10, 14]),
    ]
    rows = {row["arm"]: row for row in as_speed.summarize(runs, ["softmax", "as_skip"], margin=0.5)}
    skip, soft = rows["as_skip"], rows["softmax"]
    assert [r["seconds_to_target"] for r in runs if r["arm"] == "as_skip"] == [3.0, math.inf, 2.0]
    assert [r["seconds_to_target"] for r in runs if r["arm"] == "softmax"] == [8.0, 5.0, 6.0]
    assert skip["reached"] == 2 and soft["reached"] == 3
    # mean over the seeds that got there; the ratio's median counts a miss as the slowest
    assert skip["seconds_to_target"] == pytest.approx(2.5)
    assert skip["seconds_to_target_speedup"] == pytest.approx(sorted([8 / 3, 0.0, 3.0])[1])
    assert skip["batches_speedup"] == pytest.approx(sorted([30 / 18, 20 / 14, 20 / 14])[1])
    assert soft["seconds_to_target_speedup"] == pytest.approx(1.0)
    table = as_speed.markdown_table([soft, skip])
    assert "| as_skip | 15 ± 2 | 1.43x |" in table and "(2/3 reached)" in table


@pytest.mark.slow
def test_quick_run_reports_every_arm(as_speed, tmp_path):
    threads = torch.get_num_threads()
    try:
        results = as_speed.main(["--quick", "--data", "bbc_news", "--arms", "softmax,as_skip", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    stored = json.loads((tmp_path / "results.json").read_text())
    bbc = stored["datasets"]["bbc_news"]
    assert [row["arm"] for row in bbc["summary"]] == ["softmax", "as_skip"]
    for run in bbc["runs"]:
        assert run["batches"] <= run["full_batches"] == 2 * math.ceil(math.ceil(1557 / 10) / 32)
        assert len(run["validation_runs"]) == run["batches"] // 2
        assert 0.0 <= run["test_acc"] <= 1.0
    assert bbc["table"] in (tmp_path / "results.md").read_text()
    assert results["datasets"]["bbc_news"]["summary"][0]["seconds_to_target_speedup"] == pytest.approx(1.0)
