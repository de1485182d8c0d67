"""The paper's comparison on real data: every softmax-family loss trained on a ready-made set.

Trains the ready-made ``TextClassifier`` (bag of MiniLM word embeddings + MLP, the model of
``examples/bbc_news.yaml``) on one of the offline text datamodules (``--data``: ``BBCNews`` by
default, ``CLINC150``, ``Banking77``, ``HWU64``, ``DBpedia219``) once per loss of ``build_loss``
and seed, plus AS-Softmax with ``AdaptiveGradAccumulation`` (AS-Speed), every run with
``LossAccuracyCorrelation``. The datamodule is set up once (one tokenization) and shared; the runs
are interleaved (seed by seed, the order of the configurations rotated per seed) so that changes
in machine load hit every row alike. Prints one progress line per run and two markdown tables:

* accuracy and time: validation accuracy (the best over the validation runs of a fit, the
  checkpoint-selection value); test accuracy and macro-F1 (torchmetrics) of that best checkpoint,
  mean and standard deviation over seeds, in %; the per-seed difference of test accuracy to
  softmax (same seed), its mean ± std and a two-sided paired t-test; optimizer steps; wall-clock
  from the start of training to the end of the validation run that first reached the best
  accuracy, and of the whole fit (training and validation runs), each as a ratio to softmax's of
  the same seed (median over seeds);
* loss vs accuracy: Pearson and Spearman correlation, over the validation runs of a fit, of the
  validation loss (the loss trained on) with validation accuracy, over the whole fit
  (``LossAccuracyCorrelation``) and over the validation runs after the first epoch (the early
  runs, high loss and low accuracy, otherwise dominate); the same for the plain cross entropy of
  the same logits; and the validation cross entropy at its minimum and at the end of the fit
  (a rise means the model is in its overfitting phase). Mean ± std over seeds; near -1: the loss
  tracks accuracy.

``sparse_softmax`` keeps the ``--sparse-k`` largest logits (default 3 on BBC News' 5 classes, the
library's 10 elsewhere); ``t_softmax`` uses temperature 2, ``label_smoothing`` 0.1,
``am_softmax`` scale 30 and margin 0.35 with the model's cosine head, ``as_softmax`` delta 0.1
(the library defaults). The large-margin losses run with their defaults and the head
``classifier_head`` gives each: ``l_softmax`` and ``sphereface`` margin 4 with ``lam`` 0 (no
annealing), ``l2_softmax`` alpha 30, ``normface`` scale 30, ``cosface`` as ``am_softmax``,
``arcface`` scale 30 and margin 0.5 rad, ``weighted_softmax`` balanced weights from the training
split's class counts. New ``build_loss`` names join the comparison by themselves.
``l_softmax_annealed`` and ``sphereface_annealed`` (opt-in, ``--losses``) train those two as their
papers do: ``lam`` floor 5 and ``MarginAnnealing``'s default schedule from 1000.

    python benchmarks/compare.py                    # BBC News: 17 configurations x 3 seeds x 6 epochs, ~11 min
    python benchmarks/compare.py --out runs/compare # + results.md, results.json, results.png
    python benchmarks/compare.py --data CLINC150 --seeds 5 --out runs/clinc150
    python benchmarks/compare.py --quick            # small subsets, 1 seed, 1 epoch: a smoke run
    python benchmarks/compare.py --backbone --seeds 1 --losses softmax,as_softmax,as_speed

``--backbone`` fine-tunes the bundled offline MiniLM encoder (``sentence-transformers/
all-MiniLM-L6-v2``, 6 layers, at most 128 tokens, batch 16, lr 1e-4, 1 epoch by default) instead:
minutes per run on a CPU. Timings depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Subset
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score
from torchmetrics.functional.regression import pearson_corrcoef, spearman_corrcoef

from lightning_assoftmax import AdaptiveGradAccumulation, LossAccuracyCorrelation, MarginAnnealing
from lightning_assoftmax.data import CLINC150, HWU64, Banking77, BBCNews, DBpedia219
from lightning_assoftmax.data._text import PadCollate, TokenizedTextDataModule
from lightning_assoftmax.family import LOSS_NAMES
from lightning_assoftmax.models import TextClassifier

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
AS_SPEED = "as_speed"
BASELINE = "softmax"
CONFIG_NAMES: tuple[str, ...] = (*LOSS_NAMES, AS_SPEED)
#: Opt-in configurations (``--losses``, not in the default grid): L-Softmax and SphereFace trained
#: as their papers do, with ``MarginAnnealing``'s default schedule (lam 1000 at step 0, lowered
#: as 1000 / (1 + 0.12 step)) towards the floor 5 of the SphereFace authors' released training.
ANNEALED = {"l_softmax_annealed": "l_softmax", "sphereface_annealed": "sphereface"}
ANNEALED_FLOOR = 5.0
EXTRA_CONFIGS: tuple[str, ...] = tuple(ANNEALED)
KNOWN_CONFIGS: tuple[str, ...] = (*CONFIG_NAMES, *EXTRA_CONFIGS)
#: Settings in which the journals of one grid may differ (a grid split over processes or
#: extended with more configurations); every other setting must agree for fits to be compared.
SPLIT_SETTINGS = ("configs", "seeds")


def fixed_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that must agree between fits of one grid (all but :data:`SPLIT_SETTINGS`)."""
    return {key: value for key, value in settings.items() if key not in SPLIT_SETTINGS}


#: The ready-made single-label text datamodules, and the epochs of a bag-model fit on each: enough
#: to pass the best validation accuracy and enter the phase in which softmax's validation cross
#: entropy rises (measured with benchmarks/compare.py, see docs/results.md).
DATASETS: dict[str, type[TokenizedTextDataModule]] = {
    "BBCNews": BBCNews,
    "CLINC150": CLINC150,
    "Banking77": Banking77,
    "HWU64": HWU64,
    "DBpedia219": DBpedia219,
}
BAG_EPOCHS = {"BBCNews": 6, "CLINC150": 8, "Banking77": 8, "HWU64": 8, "DBpedia219": 8}
# --quick keeps every n-th example of each split, n chosen to leave about this many (on BBC News,
# whose splits are in class order, every class stays: 156 / 67 / 67 articles).
QUICK_SIZES = {"train": 160, "val": 80, "test": 80}
BACKBONE_MAX_LENGTH = 128


def quick_stride(size: int, split: str) -> int:
    """Keep every ``quick_stride``-th example of a split of ``size`` examples in ``--quick``."""
    return max(1, math.ceil(size / QUICK_SIZES[split]))


def config_spec(name: str, sparse_k: int) -> dict[str, Any]:
    """Loss name, its keywords and whether AS-Speed (``adaptive``) or ``MarginAnnealing``
    (``annealing``) is on, for a configuration name."""
    if name == AS_SPEED:
        return {
            "label": "as_softmax + AdaptiveGradAccumulation",
            "loss": "as_softmax",
            "loss_kwargs": {},
            "adaptive": True,
            "annealing": False,
        }
    if name in ANNEALED:
        return {
            "label": f"{ANNEALED[name]} + MarginAnnealing",
            "loss": ANNEALED[name],
            "loss_kwargs": {"lam": ANNEALED_FLOOR},
            "adaptive": False,
            "annealing": True,
        }
    kwargs = {"k": sparse_k} if name == "sparse_softmax" else {}
    label = f"sparse_softmax (k={sparse_k})" if name == "sparse_softmax" else name
    return {"label": label, "loss": name, "loss_kwargs": kwargs, "adaptive": False, "annealing": False}


def config_callbacks(spec: dict[str, Any]) -> list[L.Callback]:
    """The callbacks a configuration trains with, besides the recorders."""
    callbacks: list[L.Callback] = []
    if spec["adaptive"]:
        callbacks.append(AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=2))
    if spec["annealing"]:
        callbacks.append(MarginAnnealing())
    return callbacks


class RunRecorder(L.Callback):
    """Wall-clock and CPU time of a fit, the validation accuracy after each validation run, and
    the weights of the best one (kept in memory, for the test evaluation)."""

    def __init__(self) -> None:
        self.batches = 0
        self.points: list[dict[str, float]] = []
        self.best_acc = -math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.train_s = math.nan
        self.train_cpu_s = math.nan
        self._start = (0.0, 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = float(trainer.callback_metrics["val/acc"])
        self.points.append(
            {
                "epoch": self.batches / trainer.num_training_batches,
                "acc": acc,
                "loss": float(trainer.callback_metrics["val/loss"]),
                "ce_loss": float(trainer.callback_metrics["val/ce_loss"]),
                "seconds": time.perf_counter() - self._start[0],
            }
        )
        if acc > self.best_acc:
            self.best_acc = acc
            self.best_state = copy.deepcopy(pl_module.state_dict())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_s = time.perf_counter() - self._start[0]
        self.train_cpu_s = time.process_time() - self._start[1]

    @property
    def best_point(self) -> dict[str, float]:
        """The first validation run that reached the best accuracy."""
        return next(p for p in self.points if p["acc"] == self.best_acc)


CORRELATIONS = {"pearson": pearson_corrcoef, "spearman": spearman_corrcoef}


def correlation(
    points: list[dict[str, float]], loss_key: str = "loss", method: str = "pearson", after_epoch: float = 0.0
) -> float:
    """Correlation of ``loss_key`` (``loss`` or ``ce_loss``) with accuracy over the validation
    runs after ``after_epoch`` epochs (0: all of them); NaN with fewer than 3 runs or a constant.

    Over a whole fit the first validation runs (high loss, low accuracy) dominate the
    correlation; ``after_epoch=1`` asks whether the loss still tracks accuracy once training has
    settled.
    """
    kept = [p for p in points if p["epoch"] > after_epoch + 1e-9]
    if len(kept) < 3:
        return math.nan
    loss = torch.tensor([p[loss_key] for p in kept], dtype=torch.float64)
    acc = torch.tensor([p["acc"] for p in kept], dtype=torch.float64)
    if not (torch.isfinite(loss).all() and loss.std() > 0 and acc.std() > 0):
        return math.nan
    return float(CORRELATIONS[method](loss, acc))


def late_pearson(points: list[dict[str, float]], after_epoch: float = 1.0) -> float:
    """Pearson(validation loss, accuracy) over the validation runs after ``after_epoch`` epochs."""
    return correlation(points, "loss", "pearson", after_epoch)


#: Per-run correlation keys: (loss key, method, after epoch).
CORRELATION_KEYS = {
    f"{method}_val_{name}_acc{suffix}": (key, method, after)
    for key, name in (("loss", "loss"), ("ce_loss", "ce_loss"))
    for method in CORRELATIONS
    for after, suffix in ((0.0, ""), (1.0, "_after_epoch_1"))
}


@torch.no_grad()
def predict(model: TextClassifier, loader) -> tuple[Tensor, Tensor]:
    """Predicted and true classes (N) of every batch of ``loader``."""
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        batch = {key: value.to(model.device) for key, value in batch.items()}
        predictions.append(model(batch["input_ids"], batch["attention_mask"]).argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(predictions), torch.cat(labels)


def occurring_token_ids(data: TokenizedTextDataModule) -> Tensor:
    """Sorted token ids (long) that occur in any split, the padding id included."""
    seen = [torch.tensor([data.pad_token_id])]
    for dataset in data.datasets.values():
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        seen.extend(ids.long() for ids in base.input_ids)
    return torch.unique(torch.cat(seen))


def compact_vocabulary(data: TokenizedTextDataModule) -> Tensor:
    """Renumber the token ids of every split to ``0 .. V'-1`` (V' ids that occur); returns the
    original id of each new one, the rows a bag model's embedding table keeps.

    A row of the table that no text looks up gets no gradient and reaches no output: AdamW decays
    it, per element, and nothing reads it. Dropping those rows changes no prediction or loss, only
    the cost of each optimizer step (AdamW and the dense embedding gradient go over V' rows, not
    the tokenizer's 30522).
    """
    used = occurring_token_ids(data)
    new_id = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    new_id[used] = torch.arange(len(used))
    for dataset in data.datasets.values():
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        base.input_ids = [new_id[ids.long()] for ids in base.input_ids]
    # Padding is masked out of the bag; its new id must still index the table.
    pad = int(new_id[data.pad_token_id])
    data._collate = lambda: PadCollate(pad)
    return used


def build_model(spec: dict[str, Any], data: TokenizedTextDataModule, args: argparse.Namespace) -> TextClassifier:
    common = {
        "num_classes": data.num_classes,
        "vocab_size": data.vocab_size,
        "loss": spec["loss"],
        "loss_kwargs": spec["loss_kwargs"],
        "delta": args.delta,
    }
    if args.backbone:
        model = TextClassifier(backbone=args.pretrained, hidden_dim=0, pooling="mean", lr=1e-4, **common)
        if args.kept_token_ids is not None:
            # The same pretrained rows, only those the data can look up (see compact_vocabulary).
            words = model.encoder.get_input_embeddings()
            table = words.weight.detach()[args.kept_token_ids].clone()
            pad = words.padding_idx
            new_pad = None if pad is None else int(torch.searchsorted(args.kept_token_ids, pad))
            model.encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(table, freeze=False, padding_idx=new_pad))
        return model
    model = TextClassifier(embeddings=args.pretrained, hidden_dim=128, lr=3e-3, **common)
    if args.kept_token_ids is not None:
        table = model.embedding.weight.detach()[args.kept_token_ids].clone()
        model.embedding = torch.nn.EmbeddingBag.from_pretrained(table, freeze=False, mode="sum")
    return model


def run_once(name: str, seed: int, data: TokenizedTextDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """Fits one configuration with one seed; the per-run record of ``results.json``."""
    spec = config_spec(name, args.sparse_k)
    L.seed_everything(seed, verbose=False)
    model = build_model(spec, data, args)
    recorder = RunRecorder()
    tracker = LossAccuracyCorrelation(save_figure=False)
    callbacks: list[L.Callback] = [recorder, tracker, *config_callbacks(spec)]
    trainer = L.Trainer(
        max_epochs=args.epochs,
        val_check_interval=1.0 / args.val_per_epoch,
        num_sanity_val_steps=0,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    model.load_state_dict(recorder.best_state)
    predictions, labels = predict(model, data.test_dataloader())
    best = recorder.best_point
    ce = [p["ce_loss"] for p in recorder.points]
    lowest = min(range(len(ce)), key=ce.__getitem__)
    return {
        "config": name,
        "label": spec["label"],
        "loss": spec["loss"],
        "loss_kwargs": spec["loss_kwargs"],
        "adaptive_grad_accumulation": spec["adaptive"],
        "margin_annealing": spec["annealing"],
        "seed": seed,
        "best_val_acc": recorder.best_acc,
        "best_val_epoch": best["epoch"],
        "seconds_to_best_val_acc": best["seconds"],
        "train_seconds": recorder.train_s,
        "train_cpu_seconds": recorder.train_cpu_s,
        "optimizer_steps": int(trainer.global_step),
        "train_batches": recorder.batches,
        "test_acc": float(
            multiclass_accuracy(predictions, labels, data.num_classes, average="micro")
        ),
        "test_macro_f1": float(
            multiclass_f1_score(predictions, labels, data.num_classes, average="macro")
        ),
        # The whole-fit values as LossAccuracyCorrelation logs them; the rest from the same
        # history (the callback and the recorder see the same validation runs).
        "pearson_val_loss_acc": tracker.correlations.get("val/loss_acc_pearson", math.nan),
        "pearson_val_ce_loss_acc": tracker.correlations.get("val/ce_loss_acc_pearson", math.nan),
        "spearman_val_loss_acc": tracker.correlations.get("val/loss_acc_spearman", math.nan),
        "spearman_val_ce_loss_acc": tracker.correlations.get("val/ce_loss_acc_spearman", math.nan),
        **{
            key: correlation(recorder.points, loss_key, method, after)
            for key, (loss_key, method, after) in CORRELATION_KEYS.items()
            if after > 0
        },
        "val_ce_min": ce[lowest],
        "val_ce_min_epoch": recorder.points[lowest]["epoch"],
        "val_ce_final": ce[-1],
        "validation_runs": recorder.points,
        "test_predictions": predictions.tolist(),
        "test_labels": labels.tolist(),
    }


# -- aggregation and output --------------------------------------------------------------------
def _finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN where undefined)."""
    kept = _finite(values)
    mean = statistics.fmean(kept) if kept else math.nan
    std = statistics.stdev(kept) if len(kept) >= 2 else math.nan
    return mean, std


def paired_ratio(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str) -> float:
    """Median over seeds of ``run[key] / baseline run[key]`` (same seed)."""
    by_seed = {run["seed"]: run[key] for run in baseline}
    ratios = [run[key] / by_seed[run["seed"]] for run in runs if by_seed.get(run["seed"], 0) > 0]
    return statistics.median(ratios) if ratios else math.nan


def paired_difference(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """``run[key] - baseline run[key]`` per seed (seeds both have), their mean and sample standard
    deviation, and a two-sided paired t-test (``t``, ``p``; NaN with fewer than 2 seeds or no
    spread); ``wins`` / ``ties`` / ``losses`` count the seeds with a positive / zero / negative
    difference."""
    by_seed = {run["seed"]: run[key] for run in baseline}
    seeds = sorted(run["seed"] for run in runs if run["seed"] in by_seed)
    mine = {run["seed"]: run[key] for run in runs}
    differences = [mine[seed] - by_seed[seed] for seed in seeds]
    mean, std = mean_std(differences)
    t = p = math.nan
    if len(differences) >= 2 and math.isfinite(std) and std > 0:
        from scipy.stats import t as student_t

        t = mean / (std / math.sqrt(len(differences)))
        p = float(2 * student_t.sf(abs(t), df=len(differences) - 1))
    return {
        "seeds": seeds,
        "per_seed": differences,
        "mean": mean,
        "std": std,
        "t": t,
        "p": p,
        "wins": sum(d > 0 for d in differences),
        "ties": sum(d == 0 for d in differences),
        "losses": sum(d < 0 for d in differences),
    }


MEAN_STD_KEYS = (
    "best_val_acc",
    "test_acc",
    "test_macro_f1",
    *CORRELATION_KEYS,
    "val_ce_min",
    "val_ce_final",
)


def summarize(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """One row per configuration: means, standard deviations, paired differences and ratios to
    softmax."""
    baseline = [r for r in runs if r["config"] == BASELINE]
    rows = []
    for name in order:
        mine = [r for r in runs if r["config"] == name]
        if not mine:  # an interrupted grid (--summarize-only)
            continue
        row: dict[str, Any] = {"config": name, "label": mine[0]["label"], "seeds": len(mine)}
        for key in MEAN_STD_KEYS:
            row[key], row[f"{key}_std"] = mean_std([r.get(key, math.nan) for r in mine])
        for key in (
            "optimizer_steps",
            "train_batches",
            "seconds_to_best_val_acc",
            "train_seconds",
            "train_cpu_seconds",
        ):
            row[key] = statistics.fmean(r[key] for r in mine)
        for key in ("seconds_to_best_val_acc", "train_seconds", "train_cpu_seconds"):
            row[f"{key}_vs_softmax"] = paired_ratio(mine, baseline, key) if baseline else math.nan
        for key in ("test_acc", "test_macro_f1", "best_val_acc"):
            row[f"{key}_minus_softmax"] = paired_difference(mine, baseline, key) if baseline else None
        rows.append(row)
    return rows


def _percent(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if math.isfinite(std) else "")


def _signed(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:+.2f}" + (f" ± {std:.2f}" if math.isfinite(std) else "")


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "n/a"


def _difference(row: dict[str, Any], key: str) -> str:
    """``+0.41 ± 0.30 (p 0.04)``: the paired difference to softmax in percentage points."""
    diff = row.get(f"{key}_minus_softmax")
    if diff is None or row["config"] == BASELINE or not math.isfinite(diff["mean"]):
        return "n/a" if row["config"] != BASELINE else "0"
    text = f"{100 * diff['mean']:+.2f}" + (f" ± {100 * diff['std']:.2f}" if math.isfinite(diff["std"]) else "")
    return text + (f" (p {diff['p']:.2g})" if math.isfinite(diff["p"]) else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy and time, one line per configuration."""
    lines = [
        "| loss | val acc % | test acc % | test macro-F1 % | test acc - softmax (pp, paired) "
        "| macro-F1 - softmax (pp, paired) | optimizer steps | s to best val acc | vs softmax | train s | vs softmax |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {_percent(row['best_val_acc'], row['best_val_acc_std'])} "
            f"| {_percent(row['test_acc'], row['test_acc_std'])} "
            f"| {_percent(row['test_macro_f1'], row['test_macro_f1_std'])} "
            f"| {_difference(row, 'test_acc')} | {_difference(row, 'test_macro_f1')} "
            f"| {row['optimizer_steps']:.0f} | {row['seconds_to_best_val_acc']:.1f} "
            f"| {_ratio(row['seconds_to_best_val_acc_vs_softmax'])} | {row['train_seconds']:.1f} "
            f"| {_ratio(row['train_seconds_vs_softmax'])} |"
        )
    return "\n".join(lines)


def correlation_table(rows: list[dict[str, Any]]) -> str:
    """Loss vs accuracy over the validation runs, one line per configuration."""
    header = ["loss"]
    keys = []
    for loss_key, shown in (("loss", "val loss"), ("ce_loss", "val CE")):
        for method in CORRELATIONS:
            for suffix, when in (("", ""), ("_after_epoch_1", ", after epoch 1")):
                header.append(f"{method.capitalize()}({shown}, acc{when})")
                keys.append(f"{method}_val_{loss_key}_acc{suffix}")
    header += ["val CE at its min", "val CE at the end"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["label"], *(_signed(row[key], row[f"{key}_std"]) for key in keys)]
        for key in ("val_ce_min", "val_ce_final"):
            mean, std = row[key], row[f"{key}_std"]
            cells.append("n/a" if not math.isfinite(mean) else f"{mean:.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(args: argparse.Namespace, data: TokenizedTextDataModule) -> str:
    if args.backbone:
        model = f"TextClassifier(backbone={args.pretrained}, mean pooling, linear head), lr 1e-4"
    else:
        model = f"TextClassifier(embeddings={args.pretrained}, hidden_dim=128), lr 3e-3"
    if args.kept_token_ids is not None:
        model += f", word-embedding rows of the {len(args.kept_token_ids)} token ids that occur in the data"
    sizes = " / ".join(str(len(data.datasets[s])) for s in ("train", "val", "test"))
    quick = " (--quick subsets)" if args.quick else ""
    return (
        f"{args.data} ({sizes} texts{quick}, {data.num_classes} classes, max_length {args.max_length}, "
        f"batch {args.batch_size}), {model}, AdamW, {args.epochs} epoch(s), {args.val_per_epoch} "
        f"validation runs per epoch, seeds {args.seed_list}, torch threads {torch.get_num_threads()}"
    )


def write_figure(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy bars (mean ± std over seeds) and mean validation-accuracy curves; False without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(13, 4.8), layout="constrained")
    bars, curves = figure.subplots(1, 2, width_ratios=(3, 2))
    positions = range(len(rows))
    width = 0.4
    for offset, key, label in (
        (-width / 2, "best_val_acc", "validation (best)"),
        (width / 2, "test_acc", "test"),
    ):
        means = [100 * r[key] for r in rows]
        stds = [100 * r[f"{key}_std"] if math.isfinite(r[f"{key}_std"]) else 0.0 for r in rows]
        bars.bar([p + offset for p in positions], means, width, yerr=stds, capsize=3, label=label)
    bars.set_xticks(
        list(positions),
        [r["label"].replace(" + ", "\n+ ") for r in rows],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    low = min(100 * min(r["best_val_acc"], r["test_acc"]) for r in rows)
    bars.set_ylim(max(0.0, low - 3.0), 100.0)
    bars.set_ylabel("accuracy % (mean ± std over seeds)")
    bars.legend(loc="lower right")
    for row in rows:
        mine = [r["validation_runs"] for r in runs if r["config"] == row["config"]]
        length = min(len(points) for points in mine)
        epochs = [mine[0][i]["epoch"] for i in range(length)]
        accs = [100 * statistics.fmean(points[i]["acc"] for points in mine) for i in range(length)]
        curves.plot(epochs, accs, marker=".", label=row["label"])
    settled = [100 * p["acc"] for run in runs for p in run["validation_runs"] if p["epoch"] >= 1.0]
    if settled:  # the first validation runs lie far below; keep the plateau readable
        curves.set_ylim(bottom=min(settled) - 2.0)
        curves.set_title("from epoch 1 on (earlier runs are lower)", fontsize=9)
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation accuracy % (mean over seeds)")
    curves.legend(fontsize=7)
    figure.savefig(path, dpi=120)
    return True


def _progress_line(run: dict[str, Any], done: int, total: int) -> str:
    return (
        f"[{done:2d}/{total}] seed {run['seed']} {run['label']}: best val acc {100 * run['best_val_acc']:.2f}% "
        f"at epoch {run['best_val_epoch']:.1f} ({run['seconds_to_best_val_acc']:.1f} s), "
        f"test acc {100 * run['test_acc']:.2f}%, macro-F1 {100 * run['test_macro_f1']:.2f}%, "
        f"Pearson {_signed(run['pearson_val_loss_acc'], math.nan)}, val CE {run['val_ce_min']:.3f} "
        f"(epoch {run['val_ce_min_epoch']:.1f}) -> {run['val_ce_final']:.3f}, "
        f"{run['optimizer_steps']} steps, train {run['train_seconds']:.1f} s"
    )


def paired_summary(rows: list[dict[str, Any]]) -> str:
    """One sentence per configuration with the per-seed test-accuracy differences to softmax."""
    lines = []
    for row in rows:
        diff = row.get("test_acc_minus_softmax")
        if row["config"] == BASELINE or not diff or not diff["per_seed"]:
            continue
        per_seed = ", ".join(f"{100 * d:+.2f}" for d in diff["per_seed"])
        p = f", paired t-test p = {diff['p']:.3g}" if math.isfinite(diff["p"]) else ""
        lines.append(
            f"- {row['label']} - softmax, test acc per seed (pp): {per_seed}; mean {_difference(row, 'test_acc')}"
            f" ({diff['wins']} higher, {diff['ties']} equal, {diff['losses']} lower{p})."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="BBCNews",
        choices=list(DATASETS),
        help="the ready-made datamodule to train on (default BBCNews)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per configuration (0, 1, ...); default 3 (1 with --quick)"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds are first_seed, first_seed + 1, ... (split a grid over processes, one --out each)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: " + ", ".join(f"{k} {v}" for k, v in BAG_EPOCHS.items()) + " (bag model); 1 (--backbone)",
    )
    parser.add_argument(
        "--losses",
        default=",".join(CONFIG_NAMES),
        help=f"comma-separated configurations among {', '.join(KNOWN_CONFIGS)} "
        f"({AS_SPEED}: as_softmax with AdaptiveGradAccumulation; {', '.join(EXTRA_CONFIGS)}: the "
        "margin loss with MarginAnnealing, lam floor 5; default: all but these two)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small subsets of the splits, 1 epoch, 1 seed unless --seeds",
    )
    parser.add_argument(
        "--backbone", action="store_true", help=f"fine-tune the bundled {MINILM} encoder"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.md, results.json, results.png (and runs.jsonl, one line per finished fit)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the (configuration, seed) fits already in --out's runs.jsonl (same settings)",
    )
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="with --resume: write the tables of the fits in runs.jsonl, without running the missing ones",
    )
    parser.add_argument(
        "--sparse-k", type=int, default=None, help="k of sparse_softmax (default 3 on BBC News' 5 classes, else 10)"
    )
    parser.add_argument("--delta", type=float, default=0.1, help="AS-Softmax delta")
    parser.add_argument(
        "--val-per-epoch", type=int, default=None, help="validation runs per epoch (default 2, 3 with --quick)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (bag model), 16 (--backbone)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"tokens per text (default: the datamodule's; at most {BACKBONE_MAX_LENGTH} with --backbone)",
    )
    parser.add_argument(
        "--pretrained",
        default=MINILM,
        help="tokenizer and pretrained encoder (a name or a local directory; default: the bundled MiniLM)",
    )
    parser.add_argument(
        "--full-vocabulary",
        action="store_true",
        help="keep every row of the word-embedding table, not only those of the token ids that occur "
        "in the data (same fits, slower optimizer steps)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: steadiest on a shared machine)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN_CONFIGS]
    if unknown or not names:
        parser.error(
            f"--losses: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(KNOWN_CONFIGS)}"
        )
    names = list(dict.fromkeys(names))
    if args.resume and args.out is None:
        parser.error("--resume needs --out (the folder whose runs.jsonl to continue)")
    if args.summarize_only and not args.resume:
        parser.error("--summarize-only goes with --resume and --out (the journal to summarize)")
    if args.quick:
        args.epochs = 1
        args.seeds = args.seeds if args.seeds is not None else 1
        args.val_per_epoch = args.val_per_epoch if args.val_per_epoch is not None else 3
    if args.seeds is None:
        args.seeds = 3
    if args.val_per_epoch is None:
        args.val_per_epoch = 2
    if args.epochs is None:
        args.epochs = 1 if args.backbone else BAG_EPOCHS[args.data]
    if args.sparse_k is None:
        args.sparse_k = 3 if args.data == "BBCNews" else 10
    if args.batch_size is None:
        args.batch_size = 16 if args.backbone else 32
    for option in ("seeds", "epochs", "val_per_epoch", "sparse_k", "threads", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    # With two threads on two shared cores every op waits for the slower thread: one thread was
    # about 3x faster per step here while another process was running.
    torch.set_num_threads(args.threads)
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    datamodule_class = DATASETS[args.data]
    if args.max_length is None:
        default = 512 if datamodule_class is BBCNews else datamodule_class.default_max_length
        args.max_length = min(default, BACKBONE_MAX_LENGTH) if args.backbone else default
    if args.max_length < 3:
        parser.error(f"--max-length must be >= 3 (room for special tokens), got {args.max_length}")

    started = time.perf_counter()
    # One datamodule for every run: tokenization (cached on disk) and the split happen once.
    data = datamodule_class(batch_size=args.batch_size, max_length=args.max_length, tokenizer=args.pretrained)
    data.prepare_data()
    data.setup("fit")
    args.kept_token_ids = None if args.full_vocabulary else compact_vocabulary(data)
    if args.quick:
        for split in QUICK_SIZES:
            size = len(data.datasets[split])
            data.datasets[split] = Subset(data.datasets[split], range(0, size, quick_stride(size, split)))
    description = describe(args, data)
    print(description, flush=True)
    settings = {
        "data": args.data,
        "configs": names,
        "seeds": args.seed_list,
        "epochs": args.epochs,
        "val_per_epoch": args.val_per_epoch,
        "backbone": args.backbone,
        "quick": args.quick,
        "sparse_k": args.sparse_k,
        "delta": args.delta,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "pretrained": args.pretrained,
        "embedding_rows": len(args.kept_token_ids) if args.kept_token_ids is not None else data.vocab_size,
    }

    runs: list[dict[str, Any]] = []
    journal = args.out / "runs.jsonl" if args.out is not None else None
    if journal is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.resume and journal.is_file():
            runs = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
            keep = fixed_settings(settings)
            stale = [r for r in runs if {k: r["settings"].get(k) for k in keep} != keep]
            if stale:
                parser.error(f"--resume: {journal} holds fits with other settings ({stale[0]['settings']}); use another --out")
            runs = [r for r in runs if r["config"] in names and r["seed"] in args.seed_list]
            print(f"resuming: {len(runs)} fit(s) read from {journal}", flush=True)
        elif not args.resume:
            journal.write_text("")
    done = {(r["config"], r["seed"]) for r in runs}
    total = len(names) * args.seeds
    for seed in args.seed_list:
        # Rotate the order per seed so that load drifts do not always hit the same configuration.
        shift = seed % len(names)
        for name in names[shift:] + names[:shift]:
            if (name, seed) in done or args.summarize_only:
                continue
            run = run_once(name, seed, data, args)
            runs.append(run)
            print(_progress_line(run, len(runs), total), flush=True)
            if journal is not None:
                with journal.open("a") as handle:
                    handle.write(json.dumps({**run, "settings": settings}, allow_nan=True) + "\n")
    elapsed = time.perf_counter() - started
    order = {(name, seed): i for i, (seed, name) in enumerate((s, n) for s in args.seed_list for n in names)}
    runs.sort(key=lambda r: order[(r["config"], r["seed"])])
    for run in runs:
        run.pop("settings", None)

    rows = summarize(runs, names)
    command = (
        "python benchmarks/compare.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    table = markdown_table(rows)
    correlations = correlation_table(rows)
    if args.summarize_only:
        footer = f"{len(runs)} of {total} fits, read from {journal}."
    else:
        footer = f"{len(runs)} runs in {elapsed / 60:.1f} min (setup included{', resumed' if args.resume else ''})."
    as_speed = next((r for r in rows if r["config"] == AS_SPEED), None)
    if as_speed is not None and BASELINE in names:
        footer += (
            f" AS-Speed vs softmax (median over seeds): time to best val acc "
            f"{_ratio(as_speed['seconds_to_best_val_acc_vs_softmax'])}, training time "
            f"{_ratio(as_speed['train_seconds_vs_softmax'])}, CPU time {_ratio(as_speed['train_cpu_seconds_vs_softmax'])}."
        )
    paired = paired_summary(rows) if BASELINE in names else ""
    report = f"{description}\n\n{table}\n\n{correlations}\n\n{footer}\n" + (f"\n{paired}\n" if paired else "")
    print()
    print(report, end="", flush=True)

    results = {
        "command": command,
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "elapsed_seconds": elapsed,
        "description": description,
        "table": table,
        "correlation_table": correlations,
        "summary": rows,
        "runs": runs,
    }
    if args.out is not None:
        (args.out / "results.md").write_text(f"`{command}`\n\n{report}")
        (args.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
        drawn = write_figure(rows, runs, args.out / "results.png")
        results["figure"] = str(args.out / "results.png") if drawn else None
        written = "results.md, results.json, runs.jsonl" + (
            ", results.png" if drawn else " (no matplotlib: no figure)"
        )
        print(f"written to {args.out}: {written}", flush=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # Lightning suggests workers for in-memory data, where they would only cost time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    main()
