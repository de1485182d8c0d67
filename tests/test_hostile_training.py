"""Hostile data inside a real training run: NaN samples reach the loss through the model.

A batch with a NaN input row gives a NaN training loss. The bundle must not crash on it, must not
read it as "confident" (the accumulation window it ends keeps its size), and must not hide it:
the logged step and epoch losses are NaN, and the NaN row is not counted as a masked sample.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import EpochSeededLoader, XYSteps
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import AdaptiveGradAccumulation, ASSoftmaxMixin, LossAccuracyCorrelation

C, BATCH = 4, 4


class ConfidentClassifier(XYSteps, ASSoftmaxMixin, L.LightningModule):
    """Gives p ~ 1 to the class of a one-hot input: a correctly labelled sample is masked (loss and
    gradient exactly 0), so the data fixes every batch's masked ratio. A window whose gradient
    holds a NaN is not applied (the guard below), so the weights stay finite after a NaN batch."""

    def __init__(self):
        super().__init__(delta=0.1)
        self.net = nn.Linear(C, C)
        with torch.no_grad():
            self.net.weight.copy_(10 * torch.eye(C))
            self.net.bias.zero_()
        self.skipped_steps = 0

    def forward(self, x):
        return self.net(x)

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            self.skipped_steps += 1
            for g in grads:
                g.zero_()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def one_hot_batches(n_batches: int, nan_batches: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctly labelled one-hot samples (all masked); one row of each NaN batch is NaN."""
    cls = torch.arange(n_batches * BATCH) % C
    x = F.one_hot(cls, C).float()
    for b in nan_batches:
        x[b * BATCH, 0] = float("nan")
    return x, cls


class Windows(L.Callback):
    def __init__(self):
        self.ks: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ks.append(trainer.accumulate_grad_batches)


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_nan_batches_in_training_are_logged_and_do_not_grow_the_window(tmp_path):
    x, y = one_hot_batches(8, nan_batches=(0, 1, 2))
    xv, yv = one_hot_batches(2, nan_batches=(1,))
    model, windows = ConfidentClassifier(), Windows()
    correlation = LossAccuracyCorrelation(min_points=2, save_figure=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
        callbacks=[AdaptiveGradAccumulation(max_accumulate_grad_batches=2), correlation, windows], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, EpochSeededLoader(x, y, BATCH, shuffle=False), DataLoader(TensorDataset(xv, yv), batch_size=BATCH))

    # Batches 0-2 end windows whose loss is NaN: those windows keep size 1 although 3 of 4 samples
    # are masked (ratio 0.75 asks for 4). Batch 3 ends a finite window: 2 from batch 4 on. Without
    # the NaN the window would grow after batch 0 and switch at batch 2.
    assert windows.ks == [1, 1, 1, 1, 2, 2, 2, 2] + [2] * 8
    # Steps skipped by the module's guard: 3 windows in the first epoch, {0, 1} and {2, 3} in the second.
    assert model.skipped_steps == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())

    rows = read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    steps = [r for r in rows if "train/loss_step" in r]
    # A step row carries the value of the batch that stepped (Lightning's accumulation logging):
    # epoch 0 steps after b0, b1, b2, b3, b5, b7; epoch 1 after b1, b3, b5, b7.
    nan = [math.isnan(r["train/loss_step"]) for r in steps]
    assert nan == [True, True, True, False, False, False] + [True, False, False, False]
    assert all(r["train/loss_step"] == 0.0 for r, is_nan in zip(steps, nan, strict=True) if not is_nan)
    # The NaN row counts as a valid, unmasked sample: 3 of 4 masked.
    assert [r["train/masked_ratio_step"] for r in steps] == [0.75] * 3 + [1.0] * 3 + [0.75] + [1.0] * 3
    # Epoch values: the NaN is not averaged away; the ratio is 29 masked of 32 valid samples.
    epochs = [r for r in rows if "train/loss_epoch" in r]
    assert len(epochs) == 2 and all(math.isnan(r["train/loss_epoch"]) for r in epochs)
    assert [r["train/masked_ratio_epoch"] for r in epochs] == pytest.approx([29 / 32] * 2)
    # A NaN validation loss is logged as NaN; the correlation over it is undefined, not made up.
    assert all(math.isnan(r["val/loss"]) for r in rows if "val/loss" in r)
    assert len(correlation.history) == 2
    assert math.isnan(correlation.correlations["val/loss_acc_pearson"])
    # Monitors find the key, as NaN; the loggers get no made-up value.
    assert torch.isnan(trainer.callback_metrics["val/loss_acc_pearson"])
    assert not [r for r in rows if "val/loss_acc_pearson" in r]
