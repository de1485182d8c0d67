"""``lightning-assoftmax compare`` and ``lightning_assoftmax.compare``: arms, paired statistics
against scipy and hand-computed values, the grid's order, shards, journal and resume, the outputs,
and every bad input refused before the first fit; on a user's own module and a ready-made one."""

from __future__ import annotations

import csv
import json
import math
import sys

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TinyClassifier, blobs
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader

from lightning_assoftmax import AdaptiveGradAccumulation, SkipMaskedSamples
from lightning_assoftmax.cli import main
from lightning_assoftmax.compare import (
    CompareGrid,
    FitSetup,
    holm,
    paired_difference,
    parse_arms,
    run_compare,
    summarize,
)
from lightning_assoftmax.compare import grid as grid_module
from lightning_assoftmax.compare.stats import correlation


# -- a user's own datamodule and modules ---------------------------------------------------------
class BlobData(L.LightningDataModule):
    """Shuffled Gaussian blobs; ``test=False``: no test split, ``val=False``: no validation split."""

    def __init__(self, batch_size: int = 16, test: bool = True, val: bool = True) -> None:
        super().__init__()
        self.batch_size, self.has_test = batch_size, test
        self.num_classes = 4
        self.splits = {name: blobs(n, seed=seed) for name, n, seed in (("train", 96, 0), ("val", 48, 1), ("test", 48, 2))}
        if not val:
            type(self).val_dataloader = L.LightningDataModule.val_dataloader

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=self.batch_size)


class NoTestData(BlobData):
    test_dataloader = L.LightningDataModule.test_dataloader


class NoValData(BlobData):
    val_dataloader = L.LightningDataModule.val_dataloader


class PlainModule(L.LightningModule):
    """A classifier without ASSoftmaxMixin."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(8, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FixedLossModule(TinyClassifier):
    """Has the mixin, but its __init__ does not pass `loss` on to it."""

    def __init__(self, in_features: int = 8, num_classes: int = 4, delta: float = 0.1) -> None:
        super().__init__(in_features, num_classes, delta=delta)


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-assoftmax"])


HERE = __name__
TINY = [
    "--model=helpers.TinyClassifier",
    f"--data={HERE}.BlobData",
    "--data.batch_size=16",
    "--trainer.max_epochs=3",
    "--trainer.val_check_interval=0.5",
    "--trainer.accelerator=cpu",
]


def _compare(*args: str) -> None:
    main(["compare", *TINY, *args])


# -- arms ------------------------------------------------------------------------------------------
def test_arms_spelling():
    arms = parse_arms(
        [
            "softmax,as_softmax, label_smoothing",
            "as_softmax(delta=0.3)",
            "arcface(scale=30, margin=0.5)",
            "as_softmax + SkipMaskedSamples",
            "sparse_softmax(k=3) + AdaptiveGradAccumulation(max_accumulate_grad_batches=3) + lightning.pytorch.callbacks.Timer",
        ]
    )
    assert [a.loss for a in arms] == ["softmax", "as_softmax", "label_smoothing", "as_softmax", "arcface", "as_softmax", "sparse_softmax"]
    assert arms[3].delta == 0.3 and arms[3].loss_kwargs == {}  # the mixin's delta, not a loss keyword
    assert arms[4].loss_kwargs == {"scale": 30, "margin": 0.5} and arms[4].delta is None
    assert arms[3].key == "as_softmax(delta=0.3)" and arms[5].key == "as_softmax + SkipMaskedSamples"
    built = arms[6].build_callbacks()
    assert isinstance(built[0], AdaptiveGradAccumulation) and built[0].max_accumulate_grad_batches == 3
    assert type(built[1]).__name__ == "Timer"
    assert isinstance(arms[5].build_callbacks()[0], SkipMaskedSamples)
    # each fit gets fresh instances
    assert arms[5].build_callbacks()[0] is not arms[5].build_callbacks()[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sotfmax", "unknown loss 'sotfmax'"),
        ("as_softmax + SkipMaskedSample", "unknown callback 'SkipMaskedSample'"),
        ("as_softmax + no_module.Thing", "cannot import Thing from no_module"),
        ("sparse_softmax(kk=3)", "sparse_softmax has no keyword kk; it accepts: k"),
        ("sparse_softmax(k=0)", "k must be a positive integer, got 0"),
        ("as_softmax(delta=2)", "delta must lie in [0, 1]"),
        ("sparse_softmax(3)", "positional arguments"),
        ("arcface(margin=x)", "is not a literal"),
        ("as_softmax + SkipMaskedSamples(max_rest=-1)", "max_rest"),
        ("as_softmax + AdaptiveGradAccumulation(lambda_=1)", "AdaptiveGradAccumulation(lambda_=1)"),
        ("as_softmax - SkipMaskedSamples", "joined with '+'"),
        ("softmax,softmax", "given twice"),
        ("softmax(", "does not parse"),
    ],
)
def test_bad_arms_are_refused_with_the_fix(spec, message):
    with pytest.raises(ValueError, match=None) as error:
        parse_arms(spec)
    assert message in str(error.value)


# -- statistics --------------------------------------------------------------------------------------
SOFTMAX = [0.880, 0.874, 0.869, 0.891, 0.877]
AS = [0.884, 0.879, 0.868, 0.899, 0.880]


def test_paired_difference_matches_scipy_and_a_hand_computed_interval():
    baseline = [{"seed": s, "test_acc": v} for s, v in enumerate(SOFTMAX)]
    # out of seed order, plus a seed the baseline lacks (left out)
    fits = [{"seed": s, "test_acc": AS[s]} for s in (3, 0, 4, 2, 1)] + [{"seed": 9, "test_acc": 1.0}]
    diff = paired_difference(fits, baseline, "test_acc")
    d = np.subtract(AS, SOFTMAX)
    reference = stats.ttest_rel(AS, SOFTMAX)
    assert diff["seeds"] == [0, 1, 2, 3, 4] and diff["per_seed"] == pytest.approx(d)
    assert diff["mean"] == pytest.approx(d.mean()) and diff["std"] == pytest.approx(d.std(ddof=1))
    assert diff["t"] == pytest.approx(reference.statistic) and diff["p"] == pytest.approx(reference.pvalue)
    # t_{0.975, 4} = 2.7764451... (tables); interval mean ± t * s / sqrt(5)
    half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)
    assert (diff["low"], diff["high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    low, high = reference.confidence_interval(0.95)
    assert (diff["low"], diff["high"]) == pytest.approx((low, high))
    assert (diff["wins"], diff["ties"], diff["losses"]) == (4, 0, 1)
    # every seed shifted alike: no spread, a certain shift (or none)
    exact = [{"seed": s, "test_acc": v} for s, v in enumerate((0.25, 0.5, 0.125))]  # binary fractions
    shifted = paired_difference([{**f, "test_acc": f["test_acc"] + 0.5} for f in exact], exact, "test_acc")
    assert shifted["p"] == 0.0 and shifted["low"] == shifted["high"] == 0.5
    assert paired_difference(baseline, baseline, "test_acc")["p"] == 1.0
    one = paired_difference(fits[:1], baseline, "test_acc")
    assert one["n"] == 1 and math.isnan(one["p"]) and math.isnan(one["low"])


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.02, 0.04 (m = 3): 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # kept monotone: the largest p, 0.04 * 1, is raised to the second's 0.03 * 2
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # NaN stays NaN and does not count in m = 2
    assert holm([0.1, 0.03, math.nan]) == pytest.approx([0.1, 0.06, math.nan], nan_ok=True)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    points = [
        {"epoch": 0.5 * (i + 1), "acc": float(a), "loss": float(b), "ce_loss": float(c)}
        for i, (a, b, c) in enumerate(zip(rng.random(12), rng.random(12), rng.random(12), strict=True))
    ]
    late = points[2:]  # after epoch 1
    for key in ("loss", "ce_loss"):
        x, y = [p[key] for p in late], [p["acc"] for p in late]
        assert correlation(points, key, "pearson", 1.0) == pytest.approx(stats.pearsonr(x, y).statistic)
        assert correlation(points, key, "spearman", 1.0) == pytest.approx(stats.spearmanr(x, y).statistic)
        whole = [p[key] for p in points], [p["acc"] for p in points]
        assert correlation(points, key) == pytest.approx(stats.pearsonr(*whole).statistic)
    assert math.isnan(correlation(points[:4], "loss", "pearson", 1.0))  # 2 runs after epoch 1


def test_summary_rows_means_ratios_and_holm():
    values = {"base": [0.90, 0.94, 0.92], "a": [0.95, 0.91, 0.96], "b": [0.80, 0.84, 0.83]}
    seconds = {"base": [10.0, 20.0, 40.0], "a": [5.0, 30.0, 20.0], "b": [10.0, 20.0, 40.0]}
    fits = [
        {"arm": arm, "seed": s, "test_acc": values[arm][s], "best_seconds": seconds[arm][s], "train_seconds": 1.0,
         "optimizer_steps": 10 * (s + 1), "pearson_val_loss_acc_after_epoch_1": math.nan if s == 0 else values[arm][s]}
        for s in range(3)
        for arm in ("b", "a", "base")
    ]
    rows = {row["arm"]: row for row in summarize(fits, ["base", "a", "b"])}
    for arm, row in rows.items():
        assert row["test_acc"] == pytest.approx(np.mean(values[arm]))
        assert row["test_acc_std"] == pytest.approx(np.std(values[arm], ddof=1))
        assert row["pearson_val_loss_acc_after_epoch_1"] == pytest.approx(np.mean(values[arm][1:]))  # NaN left out
        assert row["optimizer_steps"] == pytest.approx(20.0)
    assert rows["a"]["best_seconds_vs_baseline"] == pytest.approx(0.5)  # median of 0.5, 1.5, 0.5
    p = [stats.ttest_rel(values[arm], values["base"]).pvalue for arm in ("a", "b")]
    assert [rows[arm]["test_acc_minus_baseline"]["p_holm"] for arm in ("a", "b")] == pytest.approx(holm(p))
    assert rows["b"]["test_acc_minus_baseline"]["p_holm"] == pytest.approx(2 * min(p))


# -- the grid ----------------------------------------------------------------------------------------
def test_grid_order_rotates_and_shards_partition_it():
    arms = parse_arms("softmax,as_softmax,sparsemax")
    grid = CompareGrid(arms, [0, 1, 2, 3])
    order = [(arm.key, seed) for arm, seed in grid.order()]
    assert order[:6] == [
        ("softmax", 0), ("as_softmax", 0), ("sparsemax", 0),
        ("as_softmax", 1), ("sparsemax", 1), ("softmax", 1),
    ]
    shares = [
        [(a.key, s) for a, s in CompareGrid(arms, [0, 1, 2, 3], shard=(i, 3)).my_share()] for i in (1, 2, 3)
    ]
    assert sorted(sum(shares, [])) == sorted(order) and all(len(share) == 4 for share in shares)
    with pytest.raises(ValueError, match="i must lie in 1..n"):
        grid_module.parse_shard("0/3")
    with pytest.raises(ValueError, match="must look like i/n"):
        grid_module.parse_shard("2of3")


class OrderProbe(L.Callback):
    """The targets of the first training batches of a fit."""

    def __init__(self) -> None:
        self.targets: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.targets.append(batch[1].tolist())


def test_arms_of_a_seed_share_seed_data_order_and_initial_weights():
    """softmax and as_softmax(delta=1) are the same loss: with the same initial weights and data
    order their fits are identical. A model that draws other random numbers at construction still
    sees the baseline's data order."""
    probes: dict[tuple[str, int], OrderProbe] = {}
    initial: dict[tuple[str, int], torch.Tensor] = {}
    data = BlobData()

    def factory(arm, seed, callbacks):
        model = TinyClassifier(loss=arm.loss, loss_kwargs=arm.loss_kwargs or None, delta=arm.delta if arm.delta is not None else 0.1)
        if arm.loss == "sparsemax":
            torch.randn(17)  # another architecture: other random draws at construction
        initial[arm.key, seed] = model.net.weight.detach().clone()
        probe = probes[arm.key, seed] = OrderProbe()
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, probe])
        return FitSetup(model, trainer, data)

    grid = CompareGrid(parse_arms("softmax,as_softmax(delta=1.0),sparsemax"), [0, 1])
    fits = {(f["arm"], f["seed"]): f for f in grid.run(factory, progress=False)}
    for seed in (0, 1):
        same, base = fits["as_softmax(delta=1.0)", seed], fits["softmax", seed]
        assert torch.equal(initial["softmax", seed], initial["as_softmax(delta=1.0)", seed])
        assert [p["loss"] for p in same["validation_runs"]] == pytest.approx([p["loss"] for p in base["validation_runs"]], abs=1e-6)
        assert same["test_acc"] == base["test_acc"] and same["best_val"] == base["best_val"]
        for arm in ("as_softmax(delta=1.0)", "sparsemax"):
            assert probes[arm, seed].targets == probes["softmax", seed].targets
    assert probes["softmax", 0].targets != probes["softmax", 1].targets
    assert not torch.equal(initial["softmax", 0], initial["softmax", 1])


# -- the command end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    args = ["--arms", "softmax,as_softmax", "--arms+=sparse_softmax(k=2) + SkipMaskedSamples", "--seeds", "2", "--out", str(out)]
    _compare(*args)
    return out, args


def _csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_command_writes_journal_csv_summary_and_figure(tiny_grid, capsys):
    out, args = tiny_grid
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    arms = ["softmax", "as_softmax", "sparse_softmax(k=2) + SkipMaskedSamples"]
    assert sorted((f["arm"], f["seed"]) for f in journal) == sorted((a, s) for a in arms for s in (0, 1))
    rows = _csv(out / "fits.csv")
    assert {"arm", "seed", "best_val", "test_acc", "test_macro_f1", "train_seconds", "optimizer_steps", "train_batches"} <= set(rows[0])
    assert [(r["arm"], int(r["seed"])) for r in rows] == [(a, s) for a in arms for s in (0, 1)]
    for fit in journal:
        assert fit["evaluated_on"] == "test" and fit["train_batches"] == 3 * 6
        accs = [p["acc"] for p in fit["validation_runs"]]
        assert len(accs) == 6 and fit["best_val"] == max(accs)
        assert fit["best_epoch"] == fit["validation_runs"][accs.index(max(accs))]["epoch"]
        labels, predictions = np.array(fit["test_labels"]), np.array(fit["test_predictions"])
        assert len(labels) == 48
        assert fit["test_acc"] == pytest.approx((labels == predictions).mean())
        from sklearn.metrics import f1_score

        assert fit["test_macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
        assert fit["optimizer_steps"] == 18 and fit["best_step"] <= 18
    summary = (out / "summary.md").read_text()
    assert "lightning-assoftmax compare" in summary and "--arms+=" in summary
    assert "| arm | seeds | best val/acc % | test acc % |" in summary and "torch " in summary and "cpus" in summary
    by_arm = {a: [f for f in journal if f["arm"] == a] for a in arms}
    d = [
        next(f["test_acc"] for f in by_arm["as_softmax"] if f["seed"] == s)
        - next(f["test_acc"] for f in by_arm["softmax"] if f["seed"] == s)
        for s in (0, 1)
    ]
    assert "| as_softmax | 2 | " in summary and f"{100 * np.mean(d):+.2f}" in summary
    if (out / "compare.png").exists():
        assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    else:
        pytest.importorskip("matplotlib")
        raise AssertionError("matplotlib is installed but no figure was written")


def test_rerun_skips_finished_fits_and_another_config_is_refused(tiny_grid, monkeypatch, capsys):
    out, args = tiny_grid
    before = (out / "journal.jsonl").read_text()

    def refit(*a, **k):
        raise AssertionError("refitted a fit the journal holds")

    monkeypatch.setattr(CompareGrid, "run_fit", refit)
    _compare(*args)
    assert (out / "journal.jsonl").read_text() == before
    assert "| softmax | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _compare(*args, "--trainer.max_epochs=4", "--model.lr=0.01")
    err = capsys.readouterr().err
    assert "holds fits of another configuration" in err
    assert "trainer.max_epochs: 3 in the journal, 4 now" in err and "model.init_args.lr: 0.05 in the journal, 0.01 now" in err


def _comparable(rows):
    timing = {"train_seconds", "train_cpu_seconds", "best_seconds"}
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def test_shards_merged_equal_one_run(tiny_grid, tmp_path, capsys):
    out, args = tiny_grid
    sharded = tmp_path / "sharded"
    base = [a for a in args]
    base[base.index("--out") + 1] = str(sharded)
    for shard in ("1/2", "2/2"):
        _compare(*base, "--shard", shard)
    assert sorted(p.name for p in sharded.glob("journal*")) == ["journal-shard-1-of-2.jsonl", "journal-shard-2-of-2.jsonl"]
    assert not (sharded / "fits.csv").exists()  # a shard writes only its journal
    _compare(*base, "--summarize_only=true")
    assert _comparable(_csv(sharded / "fits.csv")) == _comparable(_csv(out / "fits.csv"))
    table = [line for line in (sharded / "summary.md").read_text().splitlines() if line.startswith("| ")]
    single = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    # identical but for the time ratios (columns 9-10 of the first table)
    strip = lambda lines: [line.split(" | ")[:8] + line.split(" | ")[10:] for line in lines]  # noqa: E731
    assert strip(table) == strip(single)


def test_no_test_set_reports_validation(tmp_path, capsys):
    out = tmp_path / "noval"
    main(["compare", *TINY[:1], f"--data={HERE}.NoTestData", *TINY[3:], "--data.batch_size=16", "--trainer.max_epochs=1",
          "--arms", "softmax,as_softmax", "--seeds", "1", "--out", str(out)])
    fits = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert all(f["evaluated_on"] == "val" and len(f["test_labels"]) == 48 for f in fits)
    summary = (out / "summary.md").read_text()
    assert "has no test set" in summary and "| arm | seeds | best val/acc % | val acc % |" in summary


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arms", "softmax,sotfmax"], "unknown loss 'sotfmax'"),
        (["--arms", "softmax + NoSuchCallback"], "unknown callback 'NoSuchCallback'"),
        (["--arms", "softmax,arcface(margn=0.5)"], "arcface has no keyword margn"),
        ([f"--model={HERE}.PlainModule"], "PlainModule has none"),
        ([f"--model={HERE}.FixedLossModule"], "FixedLossModule.__init__ does not take loss, loss_kwargs"),
        ([f"--data={HERE}.NoValData"], "NoValData has no val_dataloader"),
        (["--trainer.limit_val_batches=0"], "limit_val_batches is 0"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--shard", "3/2", "--out", "x"], "i must lie in 1..n"),
    ],
)
def test_bad_input_is_refused_before_the_first_fit(args, message, monkeypatch, capsys):
    def fit(*a, **k):
        raise AssertionError("a fit started")

    monkeypatch.setattr(CompareGrid, "run_fit", fit)
    with pytest.raises(SystemExit):
        _compare(*args)
    assert message in capsys.readouterr().err


def test_an_unlogged_monitor_stops_the_first_fit(capsys):
    with pytest.raises(SystemExit):
        _compare("--arms", "softmax", "--seeds", "1", "--monitor", "val/f1")
    err = capsys.readouterr().err
    assert "'val/f1' was not logged" in err and "val/acc" in err


def test_monitor_min_selects_the_lowest(tmp_path):
    out = tmp_path / "min"
    _compare("--arms", "softmax", "--seeds", "1", "--monitor", "val/loss", "--mode", "min", "--out", str(out))
    (fit,) = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    losses = [p["loss"] for p in fit["validation_runs"]]
    assert fit["best_val"] == min(losses) and "best val/loss" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_ready_made_model_on_digits(tmp_path, capsys):
    out = tmp_path / "digits"
    main(["compare", "--model=ImageClassifier", "--model.channels=8", "--data=Digits", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
          "--trainer.val_check_interval=0.5", "--arms", "softmax,am_softmax",
          "--arms+=as_softmax + AdaptiveGradAccumulation", "--seeds", "2", "--out", str(out)])
    fits = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert len(fits) == 6 and all(len(f["validation_runs"]) == 2 for f in fits)
    speed = [f for f in fits if "AdaptiveGradAccumulation" in f["arm"]]
    assert all(1 <= f["optimizer_steps"] <= f["train_batches"] == 6 for f in speed)
    assert "| am_softmax | 2 |" in capsys.readouterr().out


def test_python_api_without_output_folder():
    data = BlobData()

    def factory(arm, seed, callbacks):
        model = TinyClassifier(loss=arm.loss, loss_kwargs=arm.loss_kwargs or None)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        return FitSetup(model, trainer, data)

    result = run_compare(CompareGrid(parse_arms("softmax,label_smoothing"), [0]), factory, echo=False)
    assert [f["arm"] for f in result.fits] == ["softmax", "label_smoothing"] and result.files == {}
    assert "| label_smoothing | 1 |" in result.report


def test_no_stopping_point_takes_fits_default_epochs(tmp_path, monkeypatch, capsys):
    from lightning_assoftmax.cli import DEFAULT_MAX_EPOCHS

    epochs = []

    def fit(self, factory, arm, seed):
        epochs.append(factory(arm, seed, []).trainer.max_epochs)
        raise SystemExit(0)

    monkeypatch.setattr(CompareGrid, "run_fit", fit)
    no_stop = [a for a in TINY if not a.startswith("--trainer.max_epochs")]
    with pytest.raises(SystemExit):
        main(["compare", *no_stop, "--arms", "softmax", "--seeds", "1"])
    assert epochs == [DEFAULT_MAX_EPOCHS]
    assert f"each fit stops after {DEFAULT_MAX_EPOCHS} epochs" in capsys.readouterr().err
