"""benchmarks/compare.py: the study's configurations as arms of the package's grid, end to end
(--quick on BBC News), the same fits as the equivalent ``lightning-assoftmax compare`` command, and
the compact embedding table against the full one."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys

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
        result = compare.main(["--quick", "--losses", ",".join(QUICK_CONFIGS), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return result, out


def test_quick_run_writes_the_package_outputs(quick_run):
    result, out = quick_run
    arms = [
        "softmax",
        "am_softmax",
        "as_softmax + AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=2)",
        "l_softmax(lam=5.0) + MarginAnnealing",
    ]
    assert [row["arm"] for row in result.rows] == arms
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert sorted(f["arm"] for f in journal) == sorted(arms)
    assert all(f["settings"]["quick"] and f["settings"]["epochs"] == 1 for f in journal)
    summary = (out / "summary.md").read_text()
    assert "python benchmarks/compare.py --quick" in summary and result.report in summary
    assert "BBCNews (156 / 67 / 67 texts (--quick subsets)" in summary
    for name in ("fits.csv", "compare.png"):
        assert (out / name).exists()


def test_quick_run_records_match_independent_computations(quick_run):
    result, _ = quick_run
    # --quick keeps every 10th training article and every 5th validation / test article.
    n_train, n_test = math.ceil(1557 / 10), math.ceil(334 / 5)
    for fit in result.fits:
        labels, predictions = fit["test_labels"], fit["test_predictions"]
        assert len(labels) == len(predictions) == n_test and set(labels) == set(range(5))
        assert fit["test_acc"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-6)
        assert fit["test_macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"), abs=1e-6)
        assert fit["train_batches"] == math.ceil(n_train / 32)
        assert 1 <= fit["optimizer_steps"] <= fit["train_batches"]
        points = fit["validation_runs"]
        assert len(points) >= 3 and points[-1]["epoch"] == pytest.approx(1.0)
        accs = [p["acc"] for p in points]
        assert fit["best_val"] == max(accs) and fit["best_epoch"] == points[accs.index(max(accs))]["epoch"]
        loss = np.array([p["loss"] for p in points])
        if np.std(accs) > 0 and np.std(loss) > 0:
            assert fit["pearson_val_loss_acc"] == pytest.approx(np.corrcoef(loss, accs)[0, 1], abs=1e-6)
    by_loss = {fit["loss"]: fit for fit in result.fits}
    assert by_loss["softmax"]["optimizer_steps"] == by_loss["softmax"]["train_batches"]
    assert by_loss["l_softmax"]["loss_kwargs"] == {"lam": 5.0}
    assert by_loss["l_softmax"]["callbacks"] == ["MarginAnnealing"]


@pytest.mark.slow
def test_the_equivalent_command_gives_the_same_fits(compare, tmp_path, capsys, monkeypatch):
    """compare.py (compact embedding table) and the ``lightning-assoftmax compare`` command it
    prints (full table, the command's own model and Trainer) fit alike, number for number."""
    from lightning_assoftmax.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-assoftmax"])
    argv = ["--data", "HWU64", "--epochs", "1", "--max-batches", "8", "--seeds", "1",
            "--losses", "softmax,am_softmax,as_speed"]
    threads = torch.get_num_threads()
    try:
        script = compare.main([*argv, "--out", str(tmp_path / "script")])
        compare.main([*argv, "--out", str(tmp_path / "command"), "--print-command"])
        command = capsys.readouterr().out.strip().splitlines()[-1]
        assert command.startswith("lightning-assoftmax compare --model=TextClassifier --data=HWU64")
        main(shlex.split(command)[1:])
    finally:
        torch.set_num_threads(threads)
    ours = {(f["arm"], f["seed"]): f for f in script.fits}
    theirs = [json.loads(line) for line in (tmp_path / "command" / "journal.jsonl").read_text().splitlines()]
    assert len(theirs) == len(ours) == 3
    for fit in theirs:
        mine = ours[fit["arm"], fit["seed"]]
        for key in ("best_val", "best_step", "test_acc", "test_macro_f1", "optimizer_steps", "train_batches",
                    "test_predictions", "val_ce_final"):
            assert fit[key] == mine[key], key
        assert [(p["acc"], p["loss"]) for p in fit["validation_runs"]] == [
            (p["acc"], p["loss"]) for p in mine["validation_runs"]
        ]


def test_unknown_configuration_is_refused_with_the_known_names(compare, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--losses", "softmax,sparsmax"])
    err = capsys.readouterr().err
    assert "sparsmax" in err and "sparsemax" in err and "as_speed" in err


def test_extra_arms_follow_the_configurations_in_order(compare, capsys):
    compare.main([
        "--data", "Banking77", "--losses", "softmax,arcface", "--arm", "arcface(delta=0.1)",
        "--arm", "as_softmax + DeltaWarmup(start_delta=1.0, warmup_fraction=0.1)", "--print-command",
    ])
    command = capsys.readouterr().out
    assert "--arms 'softmax,arcface,arcface(delta=0.1)' '--arms+=as_softmax + DeltaWarmup(start_delta=1.0, warmup_fraction=0.1)'" in command
    with pytest.raises(SystemExit):
        compare.main(["--losses", "softmax", "--arm", "arcface(margn=0.5)"])
    assert "arcface has no keyword margn" in capsys.readouterr().err


def test_configurations_become_arms(compare):
    from lightning_assoftmax import AdaptiveGradAccumulation, MarginAnnealing
    from lightning_assoftmax.compare import parse_arms

    for name, loss in (("l_softmax_annealed", "l_softmax"), ("sphereface_annealed", "sphereface")):
        assert name not in compare.CONFIG_NAMES and name in compare.KNOWN_CONFIGS
        (arm,) = parse_arms(compare.arm_spelling(name, 10))
        assert (arm.loss, arm.loss_kwargs) == (loss, {"lam": 5.0})
        (callback,) = arm.build_callbacks()
        # the default schedule: 1000 at step 0, down to the floor 5 after about 1660 steps
        assert isinstance(callback, MarginAnnealing) and callback.lam_at(0, 5.0) == 1000.0
    (speed,) = parse_arms(compare.arm_spelling("as_speed", 10))[0].build_callbacks()
    assert isinstance(speed, AdaptiveGradAccumulation) and speed.max_accumulate_grad_batches == 2
    assert compare.arm_spelling("sparse_softmax", 3) == "sparse_softmax(k=3)"


def test_compact_embedding_table_gives_the_same_model(compare):
    from lightning_assoftmax.compare import parse_arms
    from lightning_assoftmax.data import HWU64

    data = HWU64(batch_size=16)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    args = argparse.Namespace(pretrained=compare.MINILM, backbone=False, delta=0.1, kept_token_ids=None)
    (arm,) = parse_arms("as_softmax")
    torch.manual_seed(0)
    full = compare.build_model(arm, data, args)
    args.kept_token_ids = compare.compact_vocabulary(data)
    torch.manual_seed(0)
    compact = compare.build_model(arm, data, args)
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
