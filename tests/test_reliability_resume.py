"""Kill and resume: the whole bundle continues a run as if it had never stopped.

One run with ``DeltaWarmup``, ``AdaptiveGradAccumulation`` and ``LossAccuracyCorrelation`` goes
through uninterrupted. The same run is interrupted mid-epoch, right after a
``ModelCheckpoint(every_n_train_steps=...)`` save, by an exception raised from a callback (what a
crash leaves behind: the checkpoint and the CSV log; every object is then built afresh), and
resumed with ``trainer.fit(..., ckpt_path=...)``. The two must end with the same weights and the
same logged history: every CSV row, the per-batch window sizes and deltas, the correlation history.

Known limitation, asserted below so that it stays documented: Lightning does not checkpoint its
epoch accumulators, so the interrupted epoch's ``train/*_epoch`` values cover only the batches
after the resume (true of any value logged with ``on_epoch=True``, not only this bundle's).
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import EpochSeededLoader, XYSteps
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from reference import reference_as_softmax
from torch import nn

from lightning_assoftmax import (
    AdaptiveGradAccumulation,
    ASSoftmaxMixin,
    DeltaWarmup,
    LossAccuracyCorrelation,
)

N_FEATURES, N_CLASSES, BATCH, EPOCHS = 8, 4, 8, 4
# 104 samples in batches of 8: 13 batches per epoch (windows of 2 and 3 leave a short tail).
N_TRAIN, N_VAL = 104, 48
# An optimizer step inside the second epoch: windows of 2 are in force and a switch to 3 is
# pending (it waits for batch 6, a multiple of both), so the resume has to carry it over.
CHECKPOINT_STEP = 15
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


def cluster_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping clusters: the masked ratio rises during the first epochs but stays below 1."""
    centers = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(1234)) * 0.8
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, N_FEATURES, generator=g), y


class BundleClassifier(XYSteps, ASSoftmaxMixin, L.LightningModule):
    """An MLP with optimizer state (momentum) and a per-step LR schedule, both of which a resume
    must restore."""

    def __init__(self, init_seed: int = 0, delta: float = 0.1):
        super().__init__(delta=delta)
        torch.manual_seed(init_seed)
        self.net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.Tanh(), nn.Linear(16, N_CLASSES))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.5)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.98)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Interrupted(Exception):
    pass


class InterruptAfterStep(L.Callback):
    """Listed first: raises at the first batch after optimizer step ``step``, before any other
    callback or the model sees it (the checkpoint of that step is already on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Interrupted(f"interrupted at epoch {trainer.current_epoch}, batch {batch_idx}")


class BatchLog(L.Callback):
    """Listed after the bundle: what each training batch met (window size, delta) and its loss,
    recomputed from the weights it met (they only move at optimizer steps)."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(
            (trainer.current_epoch, batch_idx, trainer.global_step, trainer.accumulate_grad_batches, pl_module.as_softmax_delta)
        )
        x, y = batch
        with torch.no_grad():
            loss = reference_as_softmax(pl_module(x), y, pl_module.as_softmax_delta)
        self.batches.append({"epoch": trainer.current_epoch, "n": len(y), "loss": float(loss)})


def run(root: Path, name: str, *, checkpoints: Path, interrupt_at: int | None = None, ckpt_path: Path | None = None, init_seed: int = 0):
    """One fit of the bundle; returns the objects a caller inspects."""
    L.seed_everything(init_seed, verbose=False)
    model = BundleClassifier(init_seed=init_seed)
    bundle = {
        "warmup": DeltaWarmup(warmup_fraction=0.5),
        "accumulation": AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=3),
        "correlation": LossAccuracyCorrelation(save_figure=False),
    }
    log = BatchLog()
    checkpoint = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1)
    callbacks = ([InterruptAfterStep(interrupt_at)] if interrupt_at else []) + [*bundle.values(), log, checkpoint]
    logger = CSVLogger(root, name=name, version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=logger,
        log_every_n_steps=1,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    x, y = cluster_data(N_TRAIN, seed=0)
    xv, yv = cluster_data(N_VAL, seed=1)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=16)
    try:
        trainer.fit(model, EpochSeededLoader(x, y, BATCH), val, ckpt_path=ckpt_path)
    except Interrupted:
        pass
    rows = read_csv(Path(logger.log_dir) / "metrics.csv")
    return {"model": model, "trainer": trainer, "log": log, "rows": rows, "checkpoint": checkpoint, **bundle}


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def assert_rows_equal(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert sorted(a) == sorted(b), f"row {i}: keys {sorted(set(a) ^ set(b))} differ"
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), f"row {i} (step {a['step']}): {key}"


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    full = run(tmp_path, "full", checkpoints=tmp_path / "full_checkpoints")
    first = run(tmp_path, "first", checkpoints=tmp_path / "checkpoints", interrupt_at=CHECKPOINT_STEP)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    # Different initial weights and seed: whatever matches must come from the checkpoint. Its own
    # checkpoint folder: after a mid-epoch resume Lightning's ModelCheckpoint saves again at the
    # resume step (it does not restore the step it last saved at), here inside a window, and would
    # replace the file resumed from.
    resumed = run(tmp_path, "resumed", checkpoints=tmp_path / "resumed_checkpoints", ckpt_path=ckpt, init_seed=123)

    # The interruption is meaningful: mid-epoch, between a decided and an applied window size,
    # with the warm-up still running and correlation history already recorded.
    epoch, batch_idx, step, k, delta = resumed["log"].rows[0]
    assert step == CHECKPOINT_STEP and epoch == 1 and 0 < batch_idx < 12
    assert 0.1 < delta < 1.0
    assert len(first["correlation"].history) == 1
    (window,) = [v for key, v in saved["callbacks"].items() if key.startswith("AdaptiveGradAccumulation")]
    assert window["window_batches"] == 0  # a step checkpoint never falls inside a window
    assert (window["accumulate_grad_batches"], window["pending"]) == (k, 3) == (2, 3)
    assert [row[3] for row in resumed["log"].rows if row[0] == epoch][-1] == 3

    # Same training: window sizes, deltas and batches met, batch by batch, and the final weights.
    assert first["log"].rows + resumed["log"].rows == full["log"].rows
    assert max(row[3] for row in full["log"].rows) == 3
    for a, b in zip(resumed["model"].parameters(), full["model"].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert resumed["accumulation"].summary() == full["accumulation"].summary()

    # Same correlation history and correlations.
    history, want = resumed["correlation"].history, full["correlation"].history
    assert len(history) == EPOCHS
    for got_record, want_record in zip(history, want, strict=True):
        assert got_record == pytest.approx(want_record, rel=1e-6, abs=1e-7)
    assert resumed["correlation"].correlations == pytest.approx(full["correlation"].correlations, abs=1e-6)
    assert not any(math.isnan(v) for v in full["correlation"].correlations.values())

    # Same CSV history: the interrupted log followed by the resumed one is the uninterrupted log,
    # except the interrupted epoch's training epoch aggregates (see the module docstring).
    epoch_keys = {"train/loss_epoch", "train/masked_ratio_epoch"}
    split_rows = first["rows"] + resumed["rows"]
    aggregate = [i for i, row in enumerate(full["rows"]) if row.get("epoch") == epoch and epoch_keys & set(row)]
    assert len(aggregate) == 1
    (i,) = aggregate
    strip = [{k: v for k, v in row.items() if j != i or k not in epoch_keys} for j, row in enumerate(split_rows)]
    want_rows = [{k: v for k, v in row.items() if j != i or k not in epoch_keys} for j, row in enumerate(full["rows"])]
    assert_rows_equal(strip, want_rows)
    assert any("val/loss_acc_pearson" in row for row in resumed["rows"])
    assert any("train/accumulate_grad_batches" in row and "train/delta" in row for row in resumed["rows"])

    # The limitation, precisely: the interrupted epoch's aggregate is the mean over the batches
    # run after the resume, each weighted by its sample count.
    after = [b for b in resumed["log"].batches if b["epoch"] == epoch]
    expected = sum(b["loss"] * b["n"] for b in after) / sum(b["n"] for b in after)
    assert split_rows[i]["train/loss_epoch"] == pytest.approx(expected, rel=1e-5)
    before = [b for b in first["log"].batches if b["epoch"] == epoch]
    assert before, "the interrupted epoch must have batches before the checkpoint"
    everything = before + after
    full_mean = sum(b["loss"] * b["n"] for b in everything) / sum(b["n"] for b in everything)
    assert full["rows"][i]["train/loss_epoch"] == pytest.approx(full_mean, rel=1e-5)
    assert split_rows[i]["train/loss_epoch"] != pytest.approx(full_mean, rel=1e-3)


# -- a checkpoint taken inside a window -----------------------------------------------------------
class RecordingSGD(torch.optim.SGD):
    """Records the gradient each optimizer step applies (after the callbacks' rescaling)."""

    def __init__(self, params, lr: float, log: list):
        super().__init__(params, lr=lr)
        self.log = log

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.log.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        super().step()
        return loss


class RecordingClassifier(BundleClassifier):
    def __init__(self, init_seed: int = 0):
        super().__init__(init_seed=init_seed)
        self.step_grads: list = []

    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=0.3, log=self.step_grads)


class SaveAndStopInsideWindow(L.Callback):
    """Saves a checkpoint at the end of the first batch that opens a window of 2 (no step yet),
    then interrupts the run at the next batch."""

    def __init__(self, path: Path):
        self.path = path
        self.saved_at: tuple[int, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.saved_at is not None:
            raise Interrupted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.accumulate_grad_batches == 2 and batch_idx % 2 == 0 and batch_idx + 1 < trainer.num_training_batches:
            trainer.save_checkpoint(self.path)
            self.saved_at = (trainer.current_epoch, batch_idx)


class MicroBatches(L.Callback):
    def __init__(self):
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.seen.append({"batch_idx": batch_idx, "x": x, "y": y, "params": params, "steps": len(pl_module.step_grads)})


def reference_mean_gradient(model: nn.Module, micro_batches: list[dict]) -> list[torch.Tensor]:
    """Mean over the micro-batches of each one's mean-loss gradient (plain PyTorch, SPEC loss)."""
    total = None
    for b in micro_batches:
        params = {name: p.clone().requires_grad_(True) for name, p in b["params"].items()}
        logits = torch.func.functional_call(model, params, (b["x"],))
        grads = torch.autograd.grad(reference_as_softmax(logits, b["y"], 0.1), list(params.values()))
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads, strict=True)]
    return [t / len(micro_batches) for t in total]


def fit_with(tmp_path, model, callbacks, ckpt_path=None):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=tmp_path, deterministic=True, callbacks=callbacks,
    )
    x, y = cluster_data(N_TRAIN, seed=0)
    try:
        trainer.fit(model, EpochSeededLoader(x, y, BATCH), ckpt_path=ckpt_path)
    except Interrupted:
        pass
    return trainer


def stop_inside_a_window(tmp_path) -> tuple[Path, dict]:
    """A first fit that saves after the first micro-batch of a window of 2 and stops; returns the
    checkpoint and that micro-batch (its inputs and the weights it met)."""
    path, seen = tmp_path / "inside.ckpt", MicroBatches()
    stopper = SaveAndStopInsideWindow(path)
    fit_with(tmp_path, RecordingClassifier(), [AdaptiveGradAccumulation(max_accumulate_grad_batches=2), stopper, seen])
    assert stopper.saved_at[1] == seen.seen[-1]["batch_idx"]
    return path, seen.seen[-1]


def test_resume_inside_a_window_steps_on_the_whole_window(tmp_path):
    path, before = stop_inside_a_window(tmp_path)
    model, seen = RecordingClassifier(init_seed=5), MicroBatches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_with(tmp_path, model, [AdaptiveGradAccumulation(max_accumulate_grad_batches=2), seen], ckpt_path=path)
    assert not [w for w in caught if "AdaptiveGradAccumulation" in str(w.message)]
    # The window {batch_idx, batch_idx + 1} resumes at its second micro-batch, and its step is the
    # mean over both: the first one's gradient came back from the checkpoint.
    first = seen.seen[0]
    assert first["batch_idx"] == before["batch_idx"] + 1 and first["steps"] == 0
    assert seen.seen[1]["steps"] == 1
    for got, want in zip(model.step_grads[0], reference_mean_gradient(model, [before, first]), strict=True):
        torch.testing.assert_close(got, want)
    second = [b for b in seen.seen if b["steps"] == 1]
    assert len(second) == 2
    for got, want in zip(model.step_grads[1], reference_mean_gradient(model, second), strict=True):
        torch.testing.assert_close(got, want)


def test_resume_inside_a_window_without_its_gradients_warns_and_steps_on_the_batches_it_has(tmp_path):
    path, before = stop_inside_a_window(tmp_path)
    # A checkpoint that holds no gradients (written by an earlier version, or under FSDP).
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("AdaptiveGradAccumulation")]
    assert checkpoint["callbacks"][key].pop("window_gradients")
    torch.save(checkpoint, path)

    model, seen = RecordingClassifier(init_seed=5), MicroBatches()
    with pytest.warns(UserWarning, match=r"inside an accumulation window, after 1 of its 2 micro-batches, and holds no gradients"):
        fit_with(tmp_path, model, [AdaptiveGradAccumulation(max_accumulate_grad_batches=2), seen], ckpt_path=path)
    # The first micro-batch's gradient is gone: the step is the gradient of the one it has, not half of it.
    first = seen.seen[0]
    assert first["batch_idx"] == before["batch_idx"] + 1 and first["steps"] == 0
    assert seen.seen[1]["steps"] == 1
    for got, want in zip(model.step_grads[0], reference_mean_gradient(model, [first]), strict=True):
        torch.testing.assert_close(got, want)
    second = [b for b in seen.seen if b["steps"] == 1]
    assert len(second) == 2
    for got, want in zip(model.step_grads[1], reference_mean_gradient(model, second), strict=True):
        torch.testing.assert_close(got, want)
