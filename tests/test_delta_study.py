"""benchmarks/delta_study.py: the delta grid's journals (and the earlier script's runs) per delta
and set, checked against numbers computed here by hand and with scipy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import benchmark_module
from scipy.stats import t as student_t

SETTINGS = {"data": "HWU64", "epochs": 8, "backbone": False, "batch_size": 32, "monitor": "val/acc"}
SOFTMAX = [0.80, 0.84, 0.83]
ACC = {"as_softmax(delta=0.1)": [0.79, 0.82, 0.83], "as_softmax(delta=0.3)": [0.81, 0.845, 0.825],
       "as_softmax + DeltaWarmup(start_delta=1.0, warmup_fraction=0.1)": [0.78, 0.84, 0.80]}
TRACK = {"softmax": [0.1, -0.3, 0.2], "as_softmax(delta=0.1)": [-0.9, -0.95, -0.8],
         "as_softmax(delta=0.3)": [-0.7, -0.6, -0.8],
         "as_softmax + DeltaWarmup(start_delta=1.0, warmup_fraction=0.1)": [-0.5, -0.6, -0.7]}
MASKED = {"as_softmax(delta=0.1)": [0.95, 0.96, 0.94], "as_softmax(delta=0.3)": [0.9, 0.92, 0.91],
          "as_softmax + DeltaWarmup(start_delta=1.0, warmup_fraction=0.1)": [0.93, 0.93, 0.93]}


@pytest.fixture(scope="module")
def study():
    yield from benchmark_module("delta_study")


def _fit(arm: str, seed: int, acc: float) -> dict:
    return {"arm": arm, "seed": seed, "test_acc": acc, "pearson_val_loss_acc_after_epoch_1": TRACK[arm][seed],
            "final_masked_ratio": MASKED.get(arm, [float("nan")] * 3)[seed], "settings": SETTINGS}


def _grid(folder: Path) -> Path:
    folder.mkdir(parents=True)
    fits = [_fit("softmax", s, SOFTMAX[s]) for s in range(3)]
    fits += [_fit(arm, s, values[s]) for arm, values in ACC.items() for s in range(3)]
    (folder / "journal.jsonl").write_text("".join(json.dumps(f) + "\n" for f in fits))
    return folder


def test_rows_against_a_hand_computed_paired_difference(study, tmp_path):
    rows = {row["arm"]: row for row in study.rows_of(study.read_fits(_grid(tmp_path / "g")))}
    assert [row["arm"] for row in rows.values()][-1].startswith("as_softmax + DeltaWarmup")
    differences = np.array(ACC["as_softmax(delta=0.1)"]) - np.array(SOFTMAX)  # -0.01, -0.02, 0.00
    row = rows["as_softmax(delta=0.1)"]
    assert row["delta"] == 0.1 and not row["warmup"] and rows["as_softmax(delta=0.3)"]["delta"] == 0.3
    assert row["diff"]["mean"] == pytest.approx(-0.01) and row["diff"]["losses"] == 2
    half = student_t.ppf(0.975, 2) * differences.std(ddof=1) / np.sqrt(3)
    assert (row["diff"]["low"], row["diff"]["high"]) == pytest.approx((-0.01 - half, -0.01 + half))
    assert row["tracking"] == pytest.approx((np.mean(TRACK["as_softmax(delta=0.1)"]), np.std(TRACK["as_softmax(delta=0.1)"], ddof=1)))
    assert row["masked"][0] == pytest.approx(0.95)
    warm = rows["as_softmax + DeltaWarmup(start_delta=1.0, warmup_fraction=0.1)"]
    assert warm["warmup"] and warm["delta"] == 0.1 and warm["diff"]["mean"] == pytest.approx(-0.05 / 3)


def test_the_earlier_scripts_runs_fill_in_arms_and_the_journal_wins(study, tmp_path):
    folder = _grid(tmp_path / "g")
    runs = folder / "script_runs"
    runs.mkdir()
    # the earlier format: one file per arm, its name giving the delta; a softmax fit also in the journal
    (runs / "as_0.5.runs.jsonl").write_text("".join(
        json.dumps({"config": "as_softmax", "seed": s, "test_acc": SOFTMAX[s] - 0.02,
                    "pearson_val_loss_acc_after_epoch_1": -0.5}) + "\n" for s in range(3)))
    (runs / "softmax.runs.jsonl").write_text(json.dumps({"config": "softmax", "seed": 0, "test_acc": 0.1}) + "\n")
    rows = {row["arm"]: row for row in study.rows_of(study.read_fits(folder))}
    assert rows["as_softmax(delta=0.5)"]["diff"]["mean"] == pytest.approx(-0.02)
    assert rows["as_softmax(delta=0.5)"]["diff"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert rows["softmax"]["acc"][0] == pytest.approx(100 * np.mean(SOFTMAX))  # the journal's softmax, not 0.1
    assert np.isnan(rows["as_softmax(delta=0.5)"]["masked"][0])


def test_main_prints_the_table_and_writes_the_figure(study, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    figure = tmp_path / "delta.png"
    text = study.main([str(_grid(tmp_path / "g")), "--figure", str(figure)])
    lines = text.splitlines()
    assert lines[0].startswith("| delta | HWU64: acc vs softmax, pp | Pearson | masked |")
    assert lines[2] == "| softmax | 82.33 % (3 seeds) | +0.00 ± 0.26 | n/a |"
    assert lines[3] == "| 0.1 | -1.00 ± 1.00 (2/3 lower) | -0.88 ± 0.08 | 0.950 |"
    assert lines[-1].startswith("| 0.1 after DeltaWarmup from 1.0 | -1.67 ± ")
    assert figure.stat().st_size > 10_000


def test_a_folder_without_fits_is_refused(study, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no journal.jsonl and no script_runs"):
        study.read_fits(tmp_path / "empty")
