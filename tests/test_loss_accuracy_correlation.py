"""LossAccuracyCorrelation against correlations computed independently from recorded values."""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import XYSteps
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import ASSoftmaxMixin, LossAccuracyCorrelation

DELTA = 0.1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_NAMES = [
    "val/loss_acc_pearson",
    "val/ce_loss_acc_pearson",
    "val/loss_acc_spearman",
    "val/ce_loss_acc_spearman",
]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- independent references ------------------------------------------------------------------
def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def average_ranks(values: list[float]) -> list[float]:
    ranks = [0.0] * len(values)
    for i, v in enumerate(values):
        below = sum(1 for w in values if w < v)
        ties = sum(1 for w in values if w == v)
        ranks[i] = below + (ties + 1) / 2
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def reference_as_loss(logits: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Per-row AS-Softmax loss, one row at a time (SPEC section 2)."""
    losses = []
    for z, t in zip(logits.double(), target, strict=True):
        p = z.softmax(0)
        kept = (p[t] - p) <= delta
        kept[t] = True
        losses.append(torch.logsumexp(z[kept], 0) - z[t])
    return torch.stack(losses)


# -- a tiny task -----------------------------------------------------------------------------
def blobs(seed: int = 0, n: int = 512, n_val: int = 128):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 8, generator=g)
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def loaders(seed: int = 0):
    (xt, yt), (xv, yv) = blobs(seed)
    # No shuffling: a resumed run must see the batches an uninterrupted one sees. Equal validation
    # batches (also per rank under 2-process DDP) make the epoch mean the same whether batch means
    # are weighted by size or not, so the references below test this callback, not that weighting.
    return DataLoader(TensorDataset(xt, yt), batch_size=64), DataLoader(TensorDataset(xv, yv), batch_size=32)


class BlobsMLP(XYSteps, ASSoftmaxMixin, L.LightningModule):
    def __init__(self, lr: float = 0.05, delta: float = DELTA):
        super().__init__(delta=delta)
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ValueRecorder(Callback):
    """Recomputes the validation values from the model on the whole validation set, and notes
    what the correlation callback (listed before this one) logged at that validation run."""

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor):
        self.x_val, self.y_val = x_val, y_val
        self.values: list[dict[str, float]] = []
        self.logged: list[dict[str, float]] = []
        self.seen: list[dict[str, float]] = []
        self.steps: list[int] = []
        self.sanity_runs = 0

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            self.sanity_runs += 1
            return
        with torch.no_grad():
            logits = pl_module(self.x_val.to(pl_module.device)).cpu()
        self.values.append(
            {
                "loss": float(reference_as_loss(logits, self.y_val, DELTA).mean()),
                "ce_loss": float(F.cross_entropy(logits.double(), self.y_val)),
                "acc": float((logits.argmax(1) == self.y_val).double().mean()),
            }
        )
        metrics = trainer.callback_metrics
        self.logged.append({k: float(v) for k, v in metrics.items() if k.endswith(("_pearson", "_spearman"))})
        self.seen.append({role: float(metrics[f"val/{role}"]) for role in ("loss", "ce_loss", "acc")})
        self.steps.append(trainer.global_step)


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


class LogLines(logging.Handler):
    """Collects the lines ``rank_zero_info`` emits (Lightning's logger does not propagate)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def info_lines():
    handler = LogLines()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.lines
    log.removeHandler(handler)
    log.setLevel(level)


def fit(tmp_path, callbacks, epochs, model=None, logger=False, ckpt_path=None, seed=0, **kwargs):
    L.seed_everything(seed, verbose=False)
    kwargs.setdefault("devices", 1)
    model = model if model is not None else BlobsMLP()
    train, val = loaders()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=logger,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer


def correlation_warnings(records) -> list[str]:
    words = ("correlation", "variance", "pearson", "spearman")
    return [
        str(w.message)
        for w in records
        if any(word in str(w.message).lower() for word in words)
        or "torchmetrics" in w.filename
        or "loss_accuracy_correlation" in w.filename
    ]


# -- tests -----------------------------------------------------------------------------------
def test_logged_correlations_match_independent_formulas(tmp_path, info_lines):
    _, (xv, yv) = blobs()
    callback, recorder, logger = LossAccuracyCorrelation(), ValueRecorder(xv, yv), RecordingLogger()
    trainer = fit(tmp_path, [callback, recorder], epochs=6, logger=logger, num_sanity_val_steps=2)

    assert recorder.sanity_runs == 1  # the sanity check ran, and is not in the history
    history = callback.history
    assert len(history) == len(recorder.values) == 6
    for record, expected, seen, step in zip(history, recorder.values, recorder.seen, recorder.steps, strict=True):
        assert record["step"] == step
        for role in ("loss", "ce_loss", "acc"):
            assert record[role] == seen[role]  # exactly the epoch values Lightning holds
            assert record[role] == pytest.approx(expected[role], rel=1e-5, abs=1e-6)
    accs = [v["acc"] for v in recorder.values]
    assert len(set(accs)) > 2, "the task must move accuracy for the test to mean something"

    for i, logged in enumerate(recorder.logged):
        runs = i + 1
        if runs < 3:  # undefined yet: the keys exist for monitors, as NaN
            assert sorted(logged) == sorted(DEFAULT_NAMES)
            assert all(math.isnan(v) for v in logged.values())
            continue
        assert sorted(logged) == sorted(DEFAULT_NAMES)
        seen = recorder.values[:runs]
        acc = [v["acc"] for v in seen]
        for loss in ("loss", "ce_loss"):
            series = [v[loss] for v in seen]
            assert logged[f"val/{loss}_acc_pearson"] == pytest.approx(pearson(series, acc), abs=1e-5)
            # torchmetrics adds 1e-6 to the rank-std product
            assert logged[f"val/{loss}_acc_spearman"] == pytest.approx(spearman(series, acc), abs=1e-5)

    final = {
        f"val/{loss}_acc_{name}": function([v[loss] for v in recorder.values], accs)
        for loss in ("loss", "ce_loss")
        for name, function in (("pearson", pearson), ("spearman", spearman))
    }
    assert callback.correlations == pytest.approx(final, abs=1e-5)
    for name, value in final.items():
        assert float(trainer.callback_metrics[name]) == pytest.approx(value, abs=1e-5)

    # The loggers get every correlation at the step the validation values were logged at.
    val_steps = [step for step, metrics in logger.calls if "val/loss" in metrics]
    ours = [(step, m) for step, m in logger.calls if set(m) & set(DEFAULT_NAMES)]
    assert [step for step, _ in ours] == val_steps[2:]
    assert {k: v for k, v in ours[-1][1].items() if k != "epoch"} == pytest.approx(final, abs=1e-5)
    # each row carries its epoch, as Lightning's own rows do (no empty epoch cell in metrics.csv)
    assert [m["epoch"] for _, m in ours] == [float(epoch) for epoch in range(2, 6)]

    # the sentence names the loss the module trained with
    sentence = [line for line in info_lines if line.startswith(f"validation as_softmax(delta={DELTA}) loss vs accuracy")]
    assert len(sentence) == 1
    assert f"Pearson {final['val/loss_acc_pearson']:+.2f}" in sentence[0]
    assert f"CE loss vs accuracy: Pearson {final['val/ce_loss_acc_pearson']:+.2f}" in sentence[0]
    assert "(6 validation runs)" in sentence[0]


@pytest.mark.parametrize(("epochs", "min_points"), [(2, 3), (3, 4)])
def test_fewer_points_than_min_points_log_nothing_and_warn_nothing(tmp_path, recwarn, epochs, min_points):
    callback, logger = LossAccuracyCorrelation(min_points=min_points, save_figure=False), RecordingLogger()
    trainer = fit(tmp_path, [callback], epochs=epochs, logger=logger)

    assert len(callback.history) == epochs
    assert callback.correlations == {}
    held = {k: v for k, v in trainer.callback_metrics.items() if k.endswith(("_pearson", "_spearman"))}
    assert sorted(held) == sorted(DEFAULT_NAMES) and all(torch.isnan(v) for v in held.values())
    assert not [m for _, m in logger.calls if any(k.endswith("_pearson") for k in m)]
    assert correlation_warnings(recwarn) == []
    assert callback.compare().endswith(f"{epochs} validation runs recorded, at least {min_points} needed for a correlation")


def test_constant_series_are_undefined_not_logged_and_silent(tmp_path, recwarn):
    # lr=0: the weights never move, so loss and accuracy are identical at every validation run.
    callback, logger = LossAccuracyCorrelation(save_figure=False), RecordingLogger()
    trainer = fit(tmp_path, [callback], epochs=4, model=BlobsMLP(lr=0.0), logger=logger)

    assert len({r["acc"] for r in callback.history}) == 1
    assert sorted(callback.correlations) == sorted(DEFAULT_NAMES)
    assert all(math.isnan(v) for v in callback.correlations.values())
    held = {k: v for k, v in trainer.callback_metrics.items() if k.endswith(("_pearson", "_spearman"))}
    assert sorted(held) == sorted(DEFAULT_NAMES) and all(torch.isnan(v) for v in held.values())
    assert not [m for _, m in logger.calls if set(m) & set(DEFAULT_NAMES)]
    assert correlation_warnings(recwarn) == []
    assert callback.compare().count("undefined") == 4


def test_resume_continues_the_history(tmp_path):
    _, (xv, yv) = blobs()
    straight = LossAccuracyCorrelation(save_figure=False)
    fit(tmp_path / "straight", [straight], epochs=6)

    first = LossAccuracyCorrelation(save_figure=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(tmp_path / "first", [first, checkpoint], epochs=3)
    assert len(first.history) == 3

    resumed, recorder = LossAccuracyCorrelation(save_figure=False), ValueRecorder(xv, yv)
    # Different initial weights and seed: everything that matches must come from the checkpoint.
    checkpoint_again = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(tmp_path / "resumed", [resumed, recorder, checkpoint_again], epochs=6, model=BlobsMLP(),
        seed=123, ckpt_path=checkpoint.last_model_path)

    # The first validation after the resume already has 4 points, so it logs correlations.
    assert sorted(recorder.logged[0]) == sorted(DEFAULT_NAMES)
    assert len(resumed.history) == 6
    for got, want in zip(resumed.history, straight.history, strict=True):
        assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])
        for role in ("loss", "ce_loss", "acc"):
            assert got[role] == pytest.approx(want[role], rel=1e-6, abs=1e-7)
    assert resumed.correlations == pytest.approx(straight.correlations, abs=1e-6)
    expected = pearson([r["loss"] for r in straight.history], [r["acc"] for r in straight.history])
    assert resumed.correlations["val/loss_acc_pearson"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")
def test_resume_with_no_validation_left_reports_the_restored_correlations(tmp_path, info_lines):
    # A step checkpoint at the last batch of the last epoch (6 batches per epoch): Lightning
    # resumes it as a finished run, no validation follows, and the report at the end of training
    # comes from the restored history alone.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=24, save_top_k=-1)
    straight = LossAccuracyCorrelation(save_figure=False)
    fit(tmp_path / "first", [straight, checkpoint], epochs=4)
    (path,) = (tmp_path / "ckpt").glob("*step=24*.ckpt")

    resumed = LossAccuracyCorrelation(save_figure=False)
    fit(tmp_path / "resumed", [resumed], epochs=4, model=BlobsMLP(), ckpt_path=path)
    # the checkpoint came before the last epoch's validation run
    assert resumed.history == straight.history[:3]
    losses, accs = [r["loss"] for r in resumed.history], [r["acc"] for r in resumed.history]
    assert resumed.correlations["val/loss_acc_pearson"] == pytest.approx(pearson(losses, accs), abs=1e-6)
    assert resumed.correlations["val/loss_acc_spearman"] == pytest.approx(spearman(losses, accs), abs=1e-5)
    assert any("(3 validation runs)" in line for line in info_lines)


def test_figure_is_a_png_in_the_log_dir_and_reaches_tensorboard(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = LossAccuracyCorrelation(figure_filename="corr.png")
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [callback], epochs=4, logger=logger)

    assert callback.figure_path == os.path.join(logger.log_dir, "corr.png")
    with open(callback.figure_path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = matplotlib_image.imread(callback.figure_path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels.std() > 0  # something was drawn

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "val/loss_accuracy_correlation" in events.Tags()["images"]
    assert set(DEFAULT_NAMES) <= set(events.Tags()["scalars"])
    pearson_events = events.Scalars("val/loss_acc_pearson")
    assert len(pearson_events) == 2  # runs 3 and 4
    assert pearson_events[-1].value == pytest.approx(callback.correlations["val/loss_acc_pearson"], abs=1e-6)


def test_figure_goes_to_default_root_dir_without_logger(tmp_path):
    pytest.importorskip("matplotlib")
    callback = LossAccuracyCorrelation()
    fit(tmp_path, [callback], epochs=3)
    assert callback.figure_path == os.path.join(tmp_path, "loss_accuracy_correlation.png")
    with open(callback.figure_path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_save_figure_false_writes_nothing_and_each_fit_starts_afresh(tmp_path):
    callback = LossAccuracyCorrelation(save_figure=False)
    fit(tmp_path, [callback], epochs=3)
    assert callback.figure_path is None
    assert not list(tmp_path.rglob("*.png"))
    fit(tmp_path, [callback], epochs=2)
    assert [r["epoch"] for r in callback.history] == [0, 1]
    assert callback.correlations == {}


def test_runs_without_matplotlib(tmp_path, monkeypatch, info_lines):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    with pytest.raises(ImportError):
        from matplotlib.figure import Figure  # noqa: F401

    callback = LossAccuracyCorrelation()
    trainer = fit(tmp_path, [callback], epochs=3)
    assert "val/loss_acc_pearson" in trainer.callback_metrics
    assert callback.figure_path is None
    assert not list(tmp_path.rglob("*.png"))
    assert len([line for line in info_lines if "matplotlib" in line]) == 1


class OwnNamesModule(L.LightningModule):
    """Logs its own epoch values under its own names from on_validation_epoch_end, which runs
    after the callbacks' on_validation_epoch_end."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.epoch_values: list[dict[str, float]] = []
        self._sums = torch.zeros(3, dtype=torch.float64)
        self._count = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_validation_epoch_start(self):
        self._sums = torch.zeros(3, dtype=torch.float64)
        self._count = 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x).double()
        self._sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum"),
                F.multi_margin_loss(logits, y, reduction="sum"),
                (logits.argmax(1) == y).sum().double(),
            ]
        )
        self._count += len(y)

    def on_validation_epoch_end(self):
        loss, margin, acc = (self._sums / self._count).tolist()
        self.log_dict({"valid_loss": loss, "valid_margin": margin, "valid_accuracy": acc})
        if not self.trainer.sanity_checking:
            self.epoch_values.append({"loss": loss, "margin": margin, "acc": acc})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_module_with_its_own_names(tmp_path, info_lines):
    callback = LossAccuracyCorrelation(
        loss_key="valid_margin", ce_loss_key="valid_loss", acc_key="valid_accuracy", save_figure=False
    )
    model = OwnNamesModule()
    trainer = fit(tmp_path, [callback], epochs=5, model=model)

    acc = [v["acc"] for v in model.epoch_values]
    assert [r["acc"] for r in callback.history] == pytest.approx(acc)
    expected = {
        "valid_margin_valid_accuracy_pearson": pearson([v["margin"] for v in model.epoch_values], acc),
        "valid_loss_valid_accuracy_pearson": pearson([v["loss"] for v in model.epoch_values], acc),
    }
    for name, value in expected.items():
        assert float(trainer.callback_metrics[name]) == pytest.approx(value, abs=1e-5)
    assert any(line.startswith("validation valid_margin vs valid_accuracy: Pearson") for line in info_lines)


def test_without_ce_key_only_the_loss_is_correlated(tmp_path):
    callback = LossAccuracyCorrelation(
        loss_key="valid_loss", ce_loss_key=None, acc_key="valid_accuracy", save_figure=False
    )
    model = OwnNamesModule()
    trainer = fit(tmp_path, [callback], epochs=3, model=model)
    names = sorted(k for k in trainer.callback_metrics if k.endswith(("_pearson", "_spearman")))
    assert names == ["valid_loss_valid_accuracy_pearson", "valid_loss_valid_accuracy_spearman"]
    assert "ce_loss" not in callback.history[0]
    assert ";" not in callback.compare()


class CountTrainingBatches(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


@pytest.mark.parametrize("sanity_steps", [2, 0])
def test_missing_keys_fail_at_the_first_validation_run_with_what_to_log(tmp_path, sanity_steps):
    # With a sanity check the error comes at its end, before any training batch; without one,
    # at the end of the first validation run.
    counter = CountTrainingBatches()
    with pytest.raises(RuntimeError) as info:
        fit(tmp_path, [LossAccuracyCorrelation(save_figure=False), counter], epochs=3,
            model=OwnNamesModule(), num_sanity_val_steps=sanity_steps)
    message = str(info.value)
    assert "'val/loss', 'val/ce_loss', 'val/acc'" in message
    assert "valid_accuracy" in message  # what the module does log
    assert "loss_key=" in message and "as_softmax_loss" in message  # what to change
    assert counter.batches == (0 if sanity_steps else 6)  # 6 batches per epoch


# -- monitoring the correlations -------------------------------------------------------------------
def expected_correlations(values: list[dict[str, float]], min_points: int = 3) -> list[float]:
    """Pearson of the AS loss vs accuracy after each validation run; NaN before ``min_points``."""
    acc = [v["acc"] for v in values]
    loss = [v["loss"] for v in values]
    return [pearson(loss[:r], acc[:r]) if r >= min_points else math.nan for r in range(1, len(values) + 1)]


def test_early_stopping_monitors_a_correlation(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    _, (xv, yv) = blobs()
    recorder = ValueRecorder(xv, yv)
    stopper = EarlyStopping(monitor="val/loss_acc_pearson", mode="min", patience=3, check_finite=False)
    trainer = fit(tmp_path, [LossAccuracyCorrelation(save_figure=False), recorder, stopper], epochs=30,
                  model=BlobsMLP(lr=0.02))
    runs = len(recorder.values)
    # EarlyStopping's rule (patience 3, min_delta 0, mode min) replayed on independent values.
    best, wait, stop_at = math.inf, 0, None
    for run, value in enumerate(expected_correlations(recorder.values), start=1):
        if value < best:
            best, wait = value, 0
        else:
            wait += 1
        if wait >= 3:
            stop_at = run
            break
    assert stop_at is not None and stop_at > 3, "the task should stop early after the warm-up runs"
    assert runs == stop_at < 30
    assert trainer.should_stop
    assert float(stopper.best_score) == pytest.approx(best, abs=1e-5)


def test_model_checkpoint_monitors_a_correlation(tmp_path):
    _, (xv, yv) = blobs()
    recorder = ValueRecorder(xv, yv)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/loss_acc_pearson", mode="min", save_top_k=1,
        filename="epoch{epoch}-pearson{val/loss_acc_pearson:.4f}", auto_insert_metric_name=False,
    )
    fit(tmp_path, [LossAccuracyCorrelation(save_figure=False), recorder, checkpoint], epochs=6)
    values = expected_correlations(recorder.values)
    best_run = min(range(2, 6), key=lambda r: values[r])
    assert float(checkpoint.best_model_score) == pytest.approx(values[best_run], abs=1e-5)
    files = [p.name for p in (tmp_path / "ckpt").rglob("*.ckpt")]
    assert files == [f"epoch{best_run}-pearson{values[best_run]:.4f}.ckpt"]


def test_monitoring_needs_arguments_that_wait_for_the_correlation(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    def stopper(**kwargs):
        return EarlyStopping(monitor="val/loss_acc_pearson", **kwargs)

    cases = [
        ([LossAccuracyCorrelation(), stopper(check_finite=True, patience=3)], r"check_finite=False"),
        ([LossAccuracyCorrelation(), stopper(check_finite=False, patience=2)], r"patience=2.*patience >= 3"),
        # Checking at the end of validation, EarlyStopping must come after this callback.
        ([stopper(check_finite=False, patience=3, check_on_train_epoch_end=False), LossAccuracyCorrelation()],
         r"before EarlyStopping"),
    ]
    for callbacks, match in cases:
        counter = CountTrainingBatches()
        with pytest.raises(ValueError, match=match):
            fit(tmp_path, [*callbacks, counter], epochs=2)
        assert counter.batches == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_points": 1}, ValueError, r"min_points must be an integer >= 2 .*, got 1;"),
        ({"min_points": 2.5}, ValueError, "got 2.5"),
        ({"loss_key": None}, TypeError, "loss_key must be a non-empty metric name"),
        ({"acc_key": ""}, TypeError, "acc_key"),
        ({"figure_filename": ""}, TypeError, "figure_filename"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossAccuracyCorrelation(**kwargs)


def test_instances_with_different_keys_keep_separate_checkpoint_state():
    a = LossAccuracyCorrelation()
    b = LossAccuracyCorrelation(loss_key="val/other_loss")
    assert a.state_key != b.state_key


# -- DDP ---------------------------------------------------------------------------------------
class RankSkewedMLP(BlobsMLP):
    """Also logs a value that differs per rank, on purpose without ``sync_dist``."""

    def on_validation_epoch_end(self):
        self.log("val/rank_skewed", float(self.current_epoch + 10 * self.global_rank), sync_dist=False)


class DumpPerRank(Callback):
    def __init__(self, directory: str, correlation, skewed, x_val, y_val):
        self.directory, self.correlation, self.skewed = directory, correlation, skewed
        self.recorder = ValueRecorder(x_val, y_val)

    def on_validation_end(self, trainer, pl_module):
        self.recorder.on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(self.directory, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "history": self.correlation.history,
                    "correlations": self.correlation.correlations,
                    "skewed": self.skewed.history,
                    "reference": self.recorder.values,
                },
                f,
            )


@pytest.mark.slow
def test_ddp_ranks_share_history_and_correlations(tmp_path):
    _, (xv, yv) = blobs()
    callback = LossAccuracyCorrelation(save_figure=False)
    skewed = LossAccuracyCorrelation("val/rank_skewed", None, "val/acc", save_figure=False)
    dump = DumpPerRank(str(tmp_path), callback, skewed, xv, yv)
    fit(tmp_path, [callback, skewed, dump], epochs=4, model=RankSkewedMLP(), strategy="ddp_spawn",
        devices=2)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["correlations"] == ranks[1]["correlations"]
    # Values logged without sync differ per rank; every rank keeps rank 0's.
    for rank in ranks:
        assert [r["loss"] for r in rank["skewed"]] == [0.0, 1.0, 2.0, 3.0]
    # Each rank validated half of the set; the recorded values are the whole set's means.
    reference = ranks[0]["reference"]
    for record, expected in zip(ranks[0]["history"], reference, strict=True):
        for role in ("loss", "ce_loss", "acc"):
            assert record[role] == pytest.approx(expected[role], rel=1e-5, abs=1e-6)
    acc = [v["acc"] for v in reference]
    expected = pearson([v["loss"] for v in reference], acc)
    assert ranks[0]["correlations"]["val/loss_acc_pearson"] == pytest.approx(expected, abs=1e-5)
