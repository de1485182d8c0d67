"""CompactProgressBar: short names on the bar, logged keys unchanged."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import ASSoftmaxMixin, CompactProgressBar
from lightning_assoftmax.callbacks.progress_bar import compact_metric_name


@pytest.mark.parametrize(
    ("logged", "shown"),
    [
        ("train/masked_ratio_step", "masked"),
        ("train/masked_ratio_epoch", "masked_ep"),
        ("train/loss_step", "loss"),
        ("train/loss_epoch", "loss_ep"),
        ("val/acc", "val_acc"),
        ("val/masked_ratio", "val_masked"),
        ("val/ce_loss", "val_ce"),
        ("v_num", "v_num"),
    ],
)
def test_compact_names(logged, shown):
    assert compact_metric_name(logged) == shown


class _Tiny(ASSoftmaxMixin, L.LightningModule):
    def __init__(self):
        super().__init__(delta=0.5)
        self.layer = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.as_softmax_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.as_softmax_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bar_shows_short_names_and_loggers_keep_the_logged_keys(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    bar = CompactProgressBar()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[bar], default_root_dir=tmp_path,
    )
    module = _Tiny()
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    shown = bar.get_metrics(trainer, module)
    assert {"masked", "loss", "val_acc", "val_masked"} <= shown.keys()
    assert not any("/" in key for key in shown)
    assert shown["val_acc"] == pytest.approx(float(trainer.progress_bar_metrics["val/acc"]))
    assert "val/acc" in trainer.callback_metrics and "train/masked_ratio_step" in trainer.progress_bar_metrics


def test_cli_uses_it_unless_a_bar_is_configured(tmp_path):
    from lightning_assoftmax.cli import ASSoftmaxCLI

    args = ["--model=ImageClassifier", "--data=Digits", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    cli = ASSoftmaxCLI(args=args, run=False)
    assert sum(isinstance(cb, CompactProgressBar) for cb in cli.trainer.callbacks) == 1
    cli = ASSoftmaxCLI(args=[*args, "--trainer.enable_progress_bar=false"], run=False)
    assert not any(isinstance(cb, CompactProgressBar) for cb in cli.trainer.callbacks)
