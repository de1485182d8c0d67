"""AS-Speed benchmark: how much sooner training gets there with AS-Softmax's zero-gradient samples.

Trains the ready-made ``TextClassifier`` (bag of MiniLM word embeddings + MLP, the model of
``examples/bbc_news.yaml``, ``make demo``) four ways, side by side in one process (interleaved
seed by seed, the order rotated per seed, the same seeds for every arm):

* ``softmax``: plain cross entropy (the baseline);
* ``as_softmax``: AS-Softmax, delta 0.1;
* ``as_speed``: AS-Softmax + ``AdaptiveGradAccumulation(lam=1, max_accumulate_grad_batches=2)`` (fewer optimizer steps);
* ``as_skip``: AS-Softmax + ``SkipMaskedSamples()`` (masked samples rest, epochs get shorter).

on BBC News and, where the installed package has them, the harder intent sets Banking77 and
CLINC150. Validation runs every ``--val-every`` training batches (counted across epochs, so every
arm is validated after the same amount of training work). For each arm it reports, as mean and
standard deviation over the seeds:

* forward+backward passes: training batches run (and optimizer steps);
* seconds to target: training wall-clock (validation runs excluded) until the first validation
  run whose accuracy reaches the softmax run's best validation accuracy (same seed) minus
  ``--margin`` points; ``n/a`` when a seed never gets there (the count is shown);
* the same in CPU seconds, and to AS-Softmax's own best validation accuracy minus the margin (what
  a speed-up mechanism buys over AS-Softmax itself, whatever AS-Softmax's accuracy against softmax);
* train s and CPU s: the whole training (validation runs excluded), wall-clock and process CPU
  time (the steadier figure on a shared machine);
* final test accuracy and macro-F1 of the model at the end of training;

and the ratios to softmax (per seed, then the median; "x faster" means softmax's time divided by
the arm's; a seed that never reaches the target counts as slower than any that does, and the ratio
shows ``n/a`` when that decides the median).

    python benchmarks/as_speed.py                          # BBC News (+ harder sets), 5 seeds
    python benchmarks/as_speed.py --data bbc_news --seeds 5 --out runs/as_speed
    python benchmarks/as_speed.py --quick                  # smoke run: a subset, 1 seed, 2 epochs
    # seeds split over processes, then one table:
    python benchmarks/as_speed.py --data banking77 --seeds 3 --out runs/a &
    python benchmarks/as_speed.py --data banking77 --seeds 2 --first-seed 3 --out runs/b
    python benchmarks/as_speed.py --merge runs/a/results.json runs/b/results.json --out runs/banking77
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Subset
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

import lightning_assoftmax.data as bundled_data
from lightning_assoftmax import AdaptiveGradAccumulation, SkipMaskedSamples
from lightning_assoftmax.models import TextClassifier

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BASELINE = "softmax"


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    loss: str
    accumulate: bool = False
    skip: bool = False


ARMS = {
    arm.name: arm
    for arm in (
        Arm("softmax", "softmax", "softmax"),
        Arm("as_softmax", "AS-Softmax", "as_softmax"),
        Arm("as_speed", "AS-Softmax + AdaptiveGradAccumulation", "as_softmax", accumulate=True),
        Arm("as_skip", "AS-Softmax + SkipMaskedSamples", "as_softmax", skip=True),
    )
}


@dataclass(frozen=True)
class Dataset:
    name: str
    datamodule: str  # class name in lightning_assoftmax.data
    max_length: int
    epochs: int
    val_every: int  # training batches between validation runs


DATASETS = {
    d.name: d
    for d in (
        Dataset("bbc_news", "BBCNews", 512, 6, 7),
        Dataset("banking77", "Banking77", 128, 8, 40),
        Dataset("clinc150", "CLINC150", 128, 8, 80),
    )
}
# --quick keeps every n-th example of each split (the splits are in class order, so every class stays).
QUICK_STRIDE = {"train": 10, "val": 4, "test": 4}


class Probe(L.Callback):
    """Training time with the validation runs taken out, batches run, and each validation's accuracy."""

    def __init__(self) -> None:
        self.batches = 0
        self.points: list[dict[str, float]] = []
        self.train_s = math.nan
        self.train_cpu_s = math.nan
        self._start = (0.0, 0.0)
        self._in_validation = (0.0, 0.0)
        self._validation = [0.0, 0.0]

    def _elapsed(self) -> tuple[float, float]:
        return (
            time.perf_counter() - self._start[0] - self._validation[0],
            time.process_time() - self._start[1] - self._validation[1],
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self._in_validation = (time.perf_counter(), time.process_time())

    def on_validation_end(self, trainer, pl_module) -> None:
        seconds, cpu = self._elapsed()
        self._validation[0] += time.perf_counter() - self._in_validation[0]
        self._validation[1] += time.process_time() - self._in_validation[1]
        if trainer.sanity_checking:
            return
        acc = float(trainer.callback_metrics["val/acc"])
        self.points.append({"batches": self.batches, "seconds": seconds, "cpu_seconds": cpu, "acc": acc})

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_s, self.train_cpu_s = self._elapsed()


@torch.no_grad()
def predict(model: TextClassifier, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        predictions.append(model(batch["input_ids"], batch["attention_mask"]).argmax(dim=-1))
        labels.append(batch["labels"])
    return torch.cat(predictions), torch.cat(labels)


def run_once(arm: Arm, dataset: Dataset, data, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model = TextClassifier(
        num_classes=data.num_classes,
        vocab_size=data.vocab_size,
        embeddings=MINILM,
        hidden_dim=128,
        lr=3e-3,
        loss=arm.loss,
        delta=args.delta,
    )
    probe = Probe()
    callbacks: list[L.Callback] = [probe]
    if arm.accumulate:
        callbacks.append(AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=2))
    skipping = SkipMaskedSamples(max_rest=args.max_rest, full_data_epochs=args.full_data_epochs) if arm.skip else None
    if skipping is not None:
        callbacks.append(skipping)
    trainer = L.Trainer(
        max_epochs=args.epochs or dataset.epochs,
        val_check_interval=args.val_every or dataset.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    predictions, labels = predict(model, data.test_dataloader())
    return {
        "data": dataset.name,
        "arm": arm.name,
        "label": arm.label,
        "seed": seed,
        "batches": probe.batches,
        "full_batches": skipping.summary()["full_batches"] if skipping else probe.batches,
        "skip_epochs": skipping.summary()["epochs"] if skipping else None,
        "optimizer_steps": int(trainer.global_step),
        "train_seconds": probe.train_s,
        "train_cpu_seconds": probe.train_cpu_s,
        "validation_runs": probe.points,
        "best_val_acc": max((p["acc"] for p in probe.points), default=math.nan),
        "test_acc": float(multiclass_accuracy(predictions, labels, data.num_classes, average="micro")),
        "test_macro_f1": float(multiclass_f1_score(predictions, labels, data.num_classes, average="macro")),
    }


def time_to_target(run: dict[str, Any], target: float, key: str = "seconds") -> float:
    """Training time until the first validation run at or above ``target`` (inf if none)."""
    for point in run["validation_runs"]:
        if point["acc"] >= target - 1e-9:
            return point[key]
    return math.inf


# -- aggregation ---------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    kept = [v for v in values if math.isfinite(v)]
    mean = statistics.fmean(kept) if kept else math.nan
    std = statistics.stdev(kept) if len(kept) >= 2 else math.nan
    return mean, std


# Time-to-accuracy targets: the best validation accuracy of this arm's run (same seed) minus the
# margin; the suffix names the columns. The AS-Softmax target isolates what a speed-up mechanism
# buys over AS-Softmax itself.
REFERENCES = (("softmax", ""), ("as_softmax", "_as"))


def annotate(runs: list[dict[str, Any]], margin: float) -> None:
    """Add each run's targets and its times (wall, CPU, batches) to reach them."""
    by_arm_seed = {(r["arm"], r["seed"]): r for r in runs}
    for run in runs:
        for reference, suffix in REFERENCES:
            ref = by_arm_seed.get((reference, run["seed"]))
            target = ref["best_val_acc"] - margin / 100 if ref else math.nan
            run[f"target_acc{suffix}"] = target
            for key in ("seconds", "cpu_seconds", "batches"):
                run[f"{key}_to_target{suffix}"] = time_to_target(run, target, key) if ref else math.nan


def speedup(mine: list[dict[str, Any]], references: dict[int, dict[str, Any]], key: str) -> float:
    """Median over seeds of reference time / this arm's time; a seed whose time is infinite
    (target never reached) counts as slower than any finite ratio."""
    ratios = []
    for run in mine:
        ref = references.get(run["seed"])
        if ref is None or not math.isfinite(ref[key]):
            continue
        ratios.append(ref[key] / run[key] if math.isfinite(run[key]) and run[key] > 0 else 0.0)
    return statistics.median(ratios) if ratios else math.nan


def summarize(runs: list[dict[str, Any]], arms: list[str], margin: float) -> list[dict[str, Any]]:
    """One row per arm of one data set: means, standard deviations, ratios per seed."""
    annotate(runs, margin)
    softmax = {r["seed"]: r for r in runs if r["arm"] == BASELINE}
    as_softmax = {r["seed"]: r for r in runs if r["arm"] == "as_softmax"}
    rows = []
    for name in arms:
        mine = [r for r in runs if r["arm"] == name]
        if not mine:
            continue
        row: dict[str, Any] = {"arm": name, "label": mine[0]["label"], "seeds": len(mine)}
        for key in ("batches", "optimizer_steps", "seconds_to_target", "cpu_seconds_to_target", "batches_to_target",
                    "cpu_seconds_to_target_as", "train_seconds", "train_cpu_seconds", "test_acc", "test_macro_f1"):
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in mine])
        row["reached"] = sum(math.isfinite(r["seconds_to_target"]) for r in mine)
        row["reached_as"] = sum(math.isfinite(r["cpu_seconds_to_target_as"]) for r in mine)
        for key in ("batches", "seconds_to_target", "cpu_seconds_to_target", "train_seconds", "train_cpu_seconds"):
            row[f"{key}_speedup"] = speedup(mine, softmax, key)
        row["cpu_seconds_to_target_as_speedup"] = speedup(mine, as_softmax, "cpu_seconds_to_target_as")
        rows.append(row)
    return rows


def _pm(mean: float, std: float, fmt: str, scale: float = 1.0) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = format(scale * mean, fmt)
    return text + (f" ± {format(scale * std, fmt)}" if math.isfinite(std) else "")


def _x(value: float) -> str:
    # 0: the median seed never reached the target
    return f"{value:.2f}x" if math.isfinite(value) and value > 0 else "n/a"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | fwd+bwd passes (batches) | fewer than softmax | optimizer steps | s to target | faster than softmax "
        "| CPU s to target | faster | CPU s to AS-Softmax's target | faster than AS-Softmax | train s | CPU s "
        "| faster (CPU) | test acc % | test macro-F1 % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def reached(row: dict[str, Any], key: str) -> str:
        return "" if row[key] == row["seeds"] else f" ({row[key]}/{row['seeds']} reached)"

    for row in rows:
        lines.append(
            f"| {row['label']} | {_pm(row['batches'], row['batches_std'], '.0f')} | {_x(row['batches_speedup'])} "
            f"| {_pm(row['optimizer_steps'], row['optimizer_steps_std'], '.0f')} "
            f"| {_pm(row['seconds_to_target'], row['seconds_to_target_std'], '.1f')}{reached(row, 'reached')} "
            f"| {_x(row['seconds_to_target_speedup'])} "
            f"| {_pm(row['cpu_seconds_to_target'], row['cpu_seconds_to_target_std'], '.1f')} "
            f"| {_x(row['cpu_seconds_to_target_speedup'])} "
            f"| {_pm(row['cpu_seconds_to_target_as'], row['cpu_seconds_to_target_as_std'], '.1f')}{reached(row, 'reached_as')} "
            f"| {_x(row['cpu_seconds_to_target_as_speedup'])} "
            f"| {_pm(row['train_seconds'], row['train_seconds_std'], '.1f')} "
            f"| {_pm(row['train_cpu_seconds'], row['train_cpu_seconds_std'], '.1f')} | {_x(row['train_cpu_seconds_speedup'])} "
            f"| {_pm(row['test_acc'], row['test_acc_std'], '.2f', 100)} "
            f"| {_pm(row['test_macro_f1'], row['test_macro_f1_std'], '.2f', 100)} |"
        )
    return "\n".join(lines)


def merge(paths: list[Path], arms: list[str], margin: float, reports: list[str], results: dict[str, Any]) -> None:
    """Combine the runs of several results.json files (e.g. seeds run in separate processes)."""
    stored = [json.loads(Path(path).read_text()) for path in paths]
    for name in dict.fromkeys(n for s in stored for n in s["datasets"]):
        parts = [s["datasets"][name] for s in stored if name in s["datasets"]]
        runs = [run for part in parts for run in part["runs"]]
        seeds = sorted({run["seed"] for run in runs})
        rows = summarize(runs, arms, margin)
        table = markdown_table(rows)
        description = parts[0]["description"].split(", seeds ")[0] + f", seeds {seeds} (merged from {len(parts)} runs)"
        reports.append(f"{description}\n\n{table}\n")
        results["datasets"][name] = {"description": description, "table": table, "summary": rows, "runs": runs}


def load_data(dataset: Dataset, args: argparse.Namespace):
    cls = getattr(bundled_data, dataset.datamodule, None)
    if cls is None:
        return None
    data = cls(batch_size=args.batch_size, max_length=dataset.max_length)
    data.prepare_data()
    data.setup("fit")
    if args.quick:
        for split, stride in QUICK_STRIDE.items():
            if split in data.datasets:
                data.datasets[split] = Subset(data.datasets[split], range(0, len(data.datasets[split]), stride))
    return data


def describe(dataset: Dataset, data, args: argparse.Namespace) -> str:
    sizes = " / ".join(str(len(data.datasets[s])) for s in ("train", "val", "test"))
    return (
        f"{dataset.datamodule} ({sizes}{', --quick subsets' if args.quick else ''}; max_length {dataset.max_length}, "
        f"batch {args.batch_size}), TextClassifier(embeddings={MINILM}, hidden_dim=128), AdamW lr 3e-3, "
        f"delta {args.delta}, {args.epochs or dataset.epochs} epochs, validation every "
        f"{args.val_every or dataset.val_every} batches, seeds {args.seed_list}, torch threads {torch.get_num_threads()}; "
        f"target: softmax's best validation accuracy (same seed) minus {args.margin} points"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=",".join(DATASETS), help=f"comma-separated among {', '.join(DATASETS)} (missing ones are skipped)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated among {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="results.json files to combine into one table (no training)")
    parser.add_argument("--epochs", type=int, default=None, help="default: per data set (BBC News 6)")
    parser.add_argument("--val-every", type=int, default=None, help="training batches between validation runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--max-rest", type=int, default=4, help="SkipMaskedSamples(max_rest=...)")
    parser.add_argument("--full-data-epochs", type=int, default=1, help="SkipMaskedSamples(full_data_epochs=...)")
    parser.add_argument("--margin", type=float, default=0.5, help="points below softmax's best validation accuracy")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md and results.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tenth of the data, 1 seed, 2 epochs")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.data.split(",") if n.strip()]
    arms = [n.strip() for n in args.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS] + [a for a in arms if a not in ARMS]
    if unknown or not names or not arms:
        parser.error(f"unknown or empty --data/--arms: {', '.join(unknown) or '(none)'}")
    if BASELINE not in arms:
        parser.error("--arms must include softmax: every time is measured against it")
    if args.quick:
        args.seeds, args.epochs = 1, args.epochs or 2
        args.val_every = args.val_every or 2
    torch.set_num_threads(args.threads)
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))

    started = time.perf_counter()
    reports, results = [], {"datasets": {}}
    if args.merge:
        merge(args.merge, arms, args.margin, reports, results)
        names = []
    for name in names:
        dataset = DATASETS[name]
        data = load_data(dataset, args)
        if data is None:
            print(f"{dataset.datamodule}: not in this version of lightning_assoftmax.data, skipped", flush=True)
            continue
        print(describe(dataset, data, args), flush=True)
        runs: list[dict[str, Any]] = []
        for seed in args.seed_list:
            shift = seed % len(arms)
            for arm_name in arms[shift:] + arms[:shift]:
                run = run_once(ARMS[arm_name], dataset, data, seed, args)
                runs.append(run)
                print(
                    f"  seed {seed} {run['label']}: {run['batches']} batches, {run['optimizer_steps']} steps, "
                    f"best val acc {100 * run['best_val_acc']:.2f}%, train {run['train_seconds']:.1f} s "
                    f"(CPU {run['train_cpu_seconds']:.1f} s), test acc {100 * run['test_acc']:.2f}%",
                    flush=True,
                )
        rows = summarize(runs, arms, args.margin)
        table = markdown_table(rows)
        reports.append(f"{describe(dataset, data, args)}\n\n{table}\n")
        results["datasets"][name] = {"description": describe(dataset, data, args), "table": table, "summary": rows, "runs": runs}
    elapsed = time.perf_counter() - started
    command = "python benchmarks/as_speed.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = "\n".join(reports) + f"\n{sum(len(d['runs']) for d in results['datasets'].values())} fits in {elapsed / 60:.1f} min.\n"
    print()
    print(report, end="", flush=True)
    results.update(
        command=command,
        elapsed_seconds=elapsed,
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": args.threads},
        report=report,
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(f"`{command}`\n\n{report}")
        (args.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
        print(f"written to {args.out}: results.md, results.json", flush=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    main()
