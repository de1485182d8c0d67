"""benchmarks/compare_sets.py: compare.py journals of several sets laid out side by side, checked
against numbers computed here by hand and with scipy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import benchmark_module
from scipy.stats import ttest_rel

SETTINGS = {"data": "Banking77", "epochs": 8, "backbone": False, "batch_size": 32, "monitor": "val/acc"}


@pytest.fixture(scope="module")
def sets():
    yield from benchmark_module("compare_sets")


def _run(config: str, seed: int, test_acc: float, tracking: float, **settings) -> dict:
    return {
        "arm": config,
        "loss": config,
        "seed": seed,
        "optimizer_steps": 100,
        "train_batches": 100,
        "best_seconds": 1.0,
        "train_seconds": 2.0,
        "train_cpu_seconds": 2.0,
        "best_val": test_acc + 0.01,
        "test_acc": test_acc,
        "test_macro_f1": test_acc,
        "pearson_val_loss_acc_after_epoch_1": tracking,
        "settings": {**SETTINGS, **settings},
    }


def _journal(folder: Path, runs: list[dict], name: str = "journal.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(run) + "\n" for run in runs))
    return folder


SOFTMAX = [0.80, 0.84, 0.83]
AS = [0.82, 0.83, 0.86]
TRACK = {"softmax": [0.1, -0.3, 0.2], "as_softmax": [-0.9, -0.95, -0.8]}


def _split_grid(tmp_path: Path) -> list[Path]:
    """Seeds 0-1 in one folder (two shards' journals), seed 2 in another, and a second set."""
    runs = [
        _run(config, seed, values[seed], TRACK[config][seed])
        for seed in range(3)
        for config, values in (("softmax", SOFTMAX), ("as_softmax", AS))
    ]
    other = [_run("softmax", seed, 0.9, math.nan, data="HWU64") for seed in range(2)]
    _journal(tmp_path / "a", [r for r in runs if r["seed"] == 0], "journal-shard-1-of-2.jsonl")
    return [
        _journal(tmp_path / "a", [r for r in runs if r["seed"] == 1], "journal-shard-2-of-2.jsonl"),
        _journal(tmp_path / "b", [r for r in runs if r["seed"] == 2]),
        _journal(tmp_path / "c", other),
    ]


def test_split_grids_merge_and_the_paired_numbers_match_scipy(sets, tmp_path, capsys):
    report = sets.main([str(folder) for folder in _split_grid(tmp_path)])
    differences = 100 * (np.array(AS) - np.array(SOFTMAX))
    p = ttest_rel(AS, SOFTMAX).pvalue
    expected = f"{differences.mean():+.2f} ± {differences.std(ddof=1):.2f} (p {p:.2g})"
    assert f"| as_softmax | {expected} | – |" in report
    softmax = f"{100 * np.mean(SOFTMAX):.2f} ± {100 * np.std(SOFTMAX, ddof=1):.2f}"
    assert f"| softmax (test acc %) | {softmax} | 90.00 ± 0.00 |" in report
    assert "| arm | Banking77 (3 seeds) | HWU64 (2 seeds) |" in report
    track = f"{np.mean(TRACK['as_softmax']):+.2f} ± {np.std(TRACK['as_softmax'], ddof=1):.2f}"
    assert f"| as_softmax | {track} | – |" in report
    # softmax on HWU64 has no defined correlation in any seed
    assert f"| softmax | {np.mean(TRACK['softmax']):+.2f} ± {np.std(TRACK['softmax'], ddof=1):.2f} | n/a |" in report
    assert report in capsys.readouterr().out


def test_a_baseline_run_again_counts_once_and_a_different_one_is_refused(sets, tmp_path):
    folders = _split_grid(tmp_path)
    again = _journal(tmp_path / "again", [_run("softmax", 0, SOFTMAX[0], TRACK["softmax"][0])])
    with_again = sets.main([str(f) for f in folders] + [str(again)])
    assert with_again == sets.main([str(f) for f in folders])
    changed = _journal(tmp_path / "changed", [_run("softmax", 0, SOFTMAX[0] + 0.01, 0.0)])
    with pytest.raises(SystemExit, match=r"softmax fit of seed 0 on Banking77 is in both .*different results"):
        sets.main([str(f) for f in folders] + [str(changed)])


def test_other_settings_for_one_set_are_refused_naming_both_folders(sets, tmp_path):
    first = _journal(tmp_path / "eight", [_run("softmax", 0, 0.8, 0.0)])
    second = _journal(tmp_path / "six", [_run("softmax", 1, 0.8, 0.0, epochs=6)])
    with pytest.raises(SystemExit, match=r"six and .*eight both hold Banking77 fits, with different settings \(epochs: 6 against 8\)"):
        sets.main([str(first), str(second)])


def test_a_folder_without_a_journal_is_named(sets, tmp_path):
    with pytest.raises(SystemExit, match=r"missing holds no journal.jsonl; give folders written by compare.py"):
        sets.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "journal.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no finished fit yet"):
        sets.main([str(tmp_path / "empty")])


def test_minilm_fits_get_their_own_column(sets, tmp_path):
    bag = _journal(tmp_path / "bag", [_run("softmax", 0, 0.8, 0.0, data="CLINC150")])
    minilm = _journal(tmp_path / "minilm", [_run("softmax", 0, 0.9, 0.0, data="CLINC150", backbone=True)])
    report = sets.main([str(bag), str(minilm)])
    assert "| arm | CLINC150 (1 seeds) | CLINC150 (MiniLM) (1 seeds) |" in report


def test_figure_is_written(sets, tmp_path):
    pytest.importorskip("matplotlib")
    figure = tmp_path / "figures" / "sets.png"
    # a loss that does not train (70 points below softmax) is drawn at the panel's edge
    untrained = _journal(tmp_path / "untrained", [_run("l_softmax", s, 0.1, 0.5) for s in range(3)])
    folders = [*_split_grid(tmp_path), untrained]
    sets.main([str(folder) for folder in folders] + ["--figure", str(figure)])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

