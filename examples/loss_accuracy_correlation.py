"""Does the validation loss track validation accuracy? AS-Softmax vs plain softmax on digits.

Run ``python examples/loss_accuracy_correlation.py [--epochs 15] [--delta 0.1]``. It trains the
quickstart MLP with :class:`~lightning_assoftmax.LossAccuracyCorrelation`, prints the comparison
sentence and writes ``loss_accuracy_correlation.png`` into ``--out`` (default ``./correlation_run``).
``--delta 1`` is plain softmax cross entropy (the AS loss then equals the CE loss).
"""

from __future__ import annotations

import argparse

import lightning as L
from quickstart import DigitsMLP, digits_loaders

from lightning_assoftmax import LossAccuracyCorrelation


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="correlation_run")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_loader, val_loader = digits_loaders(seed=args.seed)
    correlation = LossAccuracyCorrelation()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        default_root_dir=args.out,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[correlation],
    )
    # The callback logs the comparison sentence and the figure's path at the end of training.
    trainer.fit(DigitsMLP(lr=args.lr, delta=args.delta), train_loader, val_loader)
    return correlation.correlations


if __name__ == "__main__":
    main()
