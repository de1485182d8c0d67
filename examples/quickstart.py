"""Quickstart: train a small MLP with AS-Softmax on scikit-learn's digits (offline, ~20 s on CPU).

Run with ``make demo`` or ``python examples/quickstart.py [--epochs 15] [--delta 0.1]``.
It prints validation accuracy, the AS-Softmax and plain cross-entropy validation losses and the
masked-sample ratio after every epoch.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import ASSoftmaxMixin, DeltaWarmup


class DigitsMLP(ASSoftmaxMixin, L.LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 1e-3, delta: float = 0.1):
        super().__init__(delta=delta)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.as_softmax_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.as_softmax_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class PrintEpoch(L.Callback):
    """One line per validation run, so the effect of AS-Softmax is visible without a logger."""

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        if "val/acc" not in m:
            return
        train_ratio = m.get("train/masked_ratio_epoch", torch.tensor(float("nan")))
        print(
            f"epoch {trainer.current_epoch:2d}  val/acc {m['val/acc']:.4f}  val/loss {m['val/loss']:.4f}  "
            f"val/ce_loss {m['val/ce_loss']:.4f}  val/masked_ratio {m['val/masked_ratio']:.3f}  "
            f"train/masked_ratio {train_ratio:.3f}"
        )


def digits_loaders(batch_size: int = 64, seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:360], order[360:]
    train = TensorDataset(x[train_idx], y[train_idx])
    val = TensorDataset(x[val_idx], y[val_idx])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        DataLoader(val, batch_size=256),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.0, help="DeltaWarmup fraction r (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_loader, val_loader = digits_loaders(seed=args.seed)
    model = DigitsMLP(delta=args.delta)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[PrintEpoch(), DeltaWarmup(warmup_fraction=args.warmup)],
    )
    trainer.fit(model, train_loader, val_loader)
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print("final: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())))
    return final


if __name__ == "__main__":
    main()
