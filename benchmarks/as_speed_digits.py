"""AS-Speed per epoch on digits: AS-Softmax with and without AdaptiveGradAccumulation, and plain softmax.

Trains the same MLP on scikit-learn's digits (offline) under each configuration, interleaved and
repeated in one process, and prints a markdown table: optimizer steps, training wall-clock and
process CPU time per epoch (median over epochs, then over repeats; validation is not part of it),
their ratio to plain AS-Softmax (per repeat, then the median) and final validation accuracy (mean over repeats, one seed per repeat, the same seeds for every
configuration).

    python benchmarks/as_speed_digits.py            # about 1.5 minutes on 2 CPU cores
    python benchmarks/as_speed_digits.py --quick    # smoke test, a few seconds

The time-to-accuracy comparison on real text (with ``SkipMaskedSamples``) is ``as_speed.py``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import AdaptiveGradAccumulation, ASSoftmaxMixin


class DigitsMLP(ASSoftmaxMixin, L.LightningModule):
    def __init__(self, hidden: int = 256, lr: float = 1e-3, delta: float = 0.1):
        super().__init__(delta=delta)
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.as_softmax_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class EpochTimer(L.Callback):
    """Wall-clock and process CPU time of each training epoch (no validation runs in these fits).

    CPU time is the steadier figure on a machine shared with other work (with one torch thread it
    is close to the compute time); wall-clock is what a user waits.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])


@dataclass(frozen=True)
class Config:
    name: str
    as_softmax: bool  # False: delta=1, plain softmax cross entropy
    adaptive: bool


CONFIGS = (
    Config("AS-Softmax + AdaptiveGradAccumulation", True, True),
    Config("AS-Softmax", True, False),
    Config("softmax (delta=1)", False, False),
)


def digits_data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:360], order[360:]
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def run_once(config: Config, args: argparse.Namespace, seed: int) -> dict[str, float]:
    (x_train, y_train), (x_val, y_val) = digits_data()
    L.seed_everything(seed, verbose=False)
    model = DigitsMLP(
        hidden=args.hidden, lr=args.lr, delta=args.delta if config.as_softmax else 1.0
    )
    timer = EpochTimer()
    callbacks: list[L.Callback] = [timer]
    adaptive = (
        AdaptiveGradAccumulation(lam=args.lam, max_accumulate_grad_batches=args.max_accumulate_grad_batches)
        if config.adaptive
        else None
    )
    if adaptive is not None:
        callbacks.append(adaptive)
    loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_val).argmax(dim=1) == y_val).float().mean())
    return {
        "steps": float(trainer.global_step),
        "batches": float(args.epochs * len(loader)),
        "epoch_seconds": statistics.median(timer.seconds),
        "epoch_cpu_seconds": statistics.median(timer.cpu_seconds),
        "val_acc": accuracy,
        "final_k": float(adaptive.accumulate_grad_batches) if adaptive else 1.0,
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--max-accumulate-grad-batches", type=int, default=2, help="cap on the window size")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 keeps timings steady)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every run's figures")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 1, 1
    torch.set_num_threads(args.threads)

    results: dict[str, list[dict[str, float]]] = {c.name: [] for c in CONFIGS}
    for repeat in range(args.repeats):
        # Interleave and rotate the order so that drifts in machine load hit every configuration.
        order = CONFIGS[repeat % len(CONFIGS) :] + CONFIGS[: repeat % len(CONFIGS)]
        for config in order:
            results[config.name].append(run_once(config, args, seed=repeat))
            if args.verbose:
                print(f"repeat {repeat} {config.name}: {results[config.name][-1]}", flush=True)

    def median_of(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    def median_ratio(name: str, key: str) -> float:
        # Paired per repeat (same seed, run next to each other), then the median over repeats.
        pairs = zip(results[name], results["AS-Softmax"], strict=True)
        return statistics.median(run[key] / ref[key] for run, ref in pairs)

    lines = [
        f"digits MLP (64-{args.hidden}-{args.hidden}-10), batch {args.batch_size}, {args.epochs} epochs, "
        f"Adam lr {args.lr}, delta {args.delta}, lam {args.lam}, max_accumulate_grad_batches {args.max_accumulate_grad_batches}, "
        f"{args.repeats} repeat(s), torch threads {args.threads}",
        "",
        "| run | optimizer steps | training batches | wall s/epoch | vs AS-Softmax | CPU s/epoch | vs AS-Softmax "
        "| final val acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS:
        runs = results[config.name]
        steps = statistics.mean(r["steps"] for r in runs)
        batches = statistics.mean(r["batches"] for r in runs)
        accuracy = statistics.mean(r["val_acc"] for r in runs)
        lines.append(
            f"| {config.name} | {steps:.0f} | {batches:.0f} | {median_of(config.name, 'epoch_seconds'):.3f} "
            f"| {median_ratio(config.name, 'epoch_seconds'):.2f}x | {median_of(config.name, 'epoch_cpu_seconds'):.3f} "
            f"| {median_ratio(config.name, 'epoch_cpu_seconds'):.2f}x | {100 * accuracy:.2f}% |"
        )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    logging.getLogger("lightning.pytorch").setLevel(
        logging.WARNING
    )  # one summary line per fit otherwise
    main()
