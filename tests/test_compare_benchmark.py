"""benchmarks/compare.py: the loss comparison on BBC News runs end to end (--quick) and reports
what it measured; its aggregation against plain numpy / scikit-learn computations."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
QUICK_CONFIGS = ("softmax", "am_softmax", "as_speed")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick_run(compare, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    try:
        results = compare.main(["--quick", "--losses", ",".join(QUICK_CONFIGS), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return results, out


def test_quick_run_writes_table_json_and_figure(quick_run):
    results, out = quick_run
    stored = json.loads((out / "results.json").read_text())
    assert [row["config"] for row in stored["summary"]] == list(QUICK_CONFIGS)
    assert (
        stored["settings"]["quick"]
        and stored["settings"]["seeds"] == [0]
        and stored["settings"]["epochs"] == 1
    )
    assert stored["command"].endswith("--out " + str(out))
    markdown = (out / "results.md").read_text()
    assert stored["table"] in markdown
    lines = [line for line in stored["table"].splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["loss", "val acc %", "test acc %", "test macro-F1 %"]
    assert "optimizer steps" in header and "s to best val acc" in header
    rows = {
        line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in lines[1:]
    }
    assert set(rows) == {"softmax", "am_softmax", "as_softmax + AdaptiveGradAccumulation"}
    for run in stored["runs"]:
        cells = rows[run["label"]]
        assert cells[2] == f"{100 * run['test_acc']:.2f}"  # one seed: the mean, no std
        assert cells[header.index("optimizer steps")] == str(run["optimizer_steps"])
    assert rows["softmax"][header.index("vs softmax")] == "1.00x"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_records_match_independent_computations(quick_run):
    results, _ = quick_run
    assert len(results["runs"]) == len(QUICK_CONFIGS)
    # --quick keeps every 10th training article and every 4th validation / test article.
    n_train, n_test = math.ceil(1557 / 10), math.ceil(334 / 4)
    for run in results["runs"]:
        assert run["seed"] == 0
        labels, predictions = run["test_labels"], run["test_predictions"]
        assert len(labels) == len(predictions) == n_test
        assert set(labels) == set(range(5))  # the subset keeps every class
        assert run["test_acc"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-6)
        assert run["test_macro_f1"] == pytest.approx(
            f1_score(labels, predictions, average="macro"), abs=1e-6
        )
        assert run["train_batches"] == math.ceil(n_train / 32)
        assert 1 <= run["optimizer_steps"] <= run["train_batches"]
        points = run["validation_runs"]
        assert len(points) >= 3 and points[-1]["epoch"] == pytest.approx(1.0)
        accs = [p["acc"] for p in points]
        best = accs.index(max(accs))
        assert run["best_val_acc"] == max(accs)
        assert run["best_val_epoch"] == points[best]["epoch"]
        assert run["seconds_to_best_val_acc"] == points[best]["seconds"] <= run["train_seconds"]
        loss = np.array([p["loss"] for p in points])
        if np.std(accs) > 0 and np.std(loss) > 0:
            assert run["pearson_val_loss_acc"] == pytest.approx(
                np.corrcoef(loss, accs)[0, 1], abs=1e-4
            )
    by_config = {run["config"]: run for run in results["runs"]}
    assert by_config["softmax"]["optimizer_steps"] == by_config["softmax"]["train_batches"]
    assert by_config["as_speed"]["adaptive_grad_accumulation"] is True
    assert by_config["as_speed"]["loss"] == "as_softmax"
    softmax_row = next(r for r in results["summary"] if r["config"] == "softmax")
    assert softmax_row["train_seconds_vs_softmax"] == 1.0


def _fake_run(compare, config: str, seed: int, value: float, seconds: float) -> dict:
    run = {
        "config": config,
        "label": config,
        "seed": seed,
        "optimizer_steps": 10 * (seed + 1),
        "train_batches": 20,
        "seconds_to_best_val_acc": seconds,
        "train_seconds": 2 * seconds,
        "train_cpu_seconds": 3 * seconds,
    }
    for key in (
        "best_val_acc",
        "test_acc",
        "test_macro_f1",
        "pearson_val_loss_acc",
        "pearson_val_ce_loss_acc",
    ):
        run[key] = value
    run["pearson_val_loss_acc_after_epoch_1"] = math.nan if seed == 0 else value
    return run


def test_summary_means_stds_and_paired_ratios(compare):
    values = {"softmax": [0.90, 0.94, 0.92], "as_speed": [0.95, 0.91, 0.96]}
    seconds = {"softmax": [10.0, 20.0, 40.0], "as_speed": [5.0, 30.0, 20.0]}
    runs = [
        _fake_run(compare, config, seed, values[config][seed], seconds[config][seed])
        for seed in range(3)
        for config in ("as_speed", "softmax")  # interleaved, not grouped
    ]
    rows = {row["config"]: row for row in compare.summarize(runs, ["softmax", "as_speed"])}
    for config, row in rows.items():
        assert row["seeds"] == 3
        assert row["test_acc"] == pytest.approx(np.mean(values[config]))
        assert row["test_acc_std"] == pytest.approx(np.std(values[config], ddof=1))
        # A NaN (an undefined correlation) is left out of the mean, not propagated.
        assert row["pearson_val_loss_acc_after_epoch_1"] == pytest.approx(
            np.mean(values[config][1:])
        )
        assert row["optimizer_steps"] == pytest.approx(20.0)
    # Per seed: 5/10, 30/20, 20/40 -> median 0.5.
    assert rows["as_speed"]["seconds_to_best_val_acc_vs_softmax"] == pytest.approx(0.5)
    assert rows["as_speed"]["train_cpu_seconds_vs_softmax"] == pytest.approx(0.5)
    assert rows["softmax"]["train_seconds_vs_softmax"] == pytest.approx(1.0)
    table = compare.markdown_table(list(rows.values()))
    assert (
        f"| as_speed | {100 * np.mean(values['as_speed']):.2f} ± {100 * np.std(values['as_speed'], ddof=1):.2f} |"
        in table
    )


def test_unknown_loss_is_refused_with_the_known_names(compare, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--losses", "softmax,sparsmax"])
    err = capsys.readouterr().err
    assert "sparsmax" in err and "sparsemax" in err and "as_speed" in err
