"""What one fit of a comparison records: the validation history, the best weights, the times,
and the predictions of the best weights on the evaluation split."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

__all__ = ["FitRecorder", "PredictionCapture"]

# Validation values kept per validation run besides the monitored one (when the model logs them:
# ASSoftmaxMixin does).
_POINT_KEYS = {"acc": "val/acc", "loss": "val/loss", "ce_loss": "val/ce_loss", "masked_ratio": "val/masked_ratio"}


def _value(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    if value is None:
        return math.nan
    return float(value.item() if isinstance(value, Tensor) else value)


class FitRecorder(L.Callback):
    """Records every validation run of a fit (not the sanity check, not a later ``validate``)
    and keeps, in memory, the weights of the first run with the best ``monitor`` value.

    ``points``: one dict per validation run with ``step`` (optimizer steps so far), ``epoch``
    (training batches so far / batches per epoch), ``seconds`` (wall-clock since the start of
    training), ``monitor`` and the mixin's ``acc``, ``loss``, ``ce_loss``, ``masked_ratio``
    (NaN when not logged).
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.points: list[dict[str, float]] = []
        self.best_index: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.batches = 0
        self.train_seconds = math.nan
        self.train_cpu_seconds = math.nan
        self.final_masked_ratio = math.nan
        self._start = (0.0, 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            logged = ", ".join(sorted(k for k in metrics if k.startswith("val"))) or "none"
            raise ValueError(
                f"compare: the monitored metric {self.monitor!r} was not logged in validation "
                f"(validation metrics logged: {logged}); pass --monitor with one of them."
            )
        point = {
            "step": int(trainer.global_step),
            "epoch": self.batches / max(trainer.num_training_batches, 1),
            "seconds": time.perf_counter() - self._start[0],
            "monitor": _value(metrics, self.monitor),
            **{name: _value(metrics, key) for name, key in _POINT_KEYS.items()},
        }
        self.points.append(point)
        value = point["monitor"]
        best = None if self.best_index is None else self.points[self.best_index]["monitor"]
        better = math.isfinite(value) and (
            best is None or (value > best if self.mode == "max" else value < best)
        )
        if better:
            self.best_index = len(self.points) - 1
            self.best_state = copy.deepcopy(pl_module.state_dict())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_seconds = time.perf_counter() - self._start[0]
        self.train_cpu_seconds = time.process_time() - self._start[1]
        self.final_masked_ratio = _value(trainer.callback_metrics, "train/masked_ratio_epoch")

    @property
    def best_point(self) -> dict[str, float] | None:
        return None if self.best_index is None else self.points[self.best_index]


class PredictionCapture(L.Callback):
    """Collects the predicted and true classes of every batch that an ``ASSoftmaxMixin`` model
    logs in a ``validate`` or ``test`` run (all its loss methods log through one place), flattened
    over positions, ignored positions left out; multi-label: one 0/1 prediction per label at the
    score threshold 0."""

    def __init__(self) -> None:
        self.predictions: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.num_classes = 0

    def _wrap(self, pl_module: L.LightningModule) -> None:
        original = pl_module._as_softmax_log

        def log(stage, loss, masked, count, logits, target, *args, **kwargs):
            if logits is not None:
                self._keep(pl_module, logits.detach(), target.detach())
            return original(stage, loss, masked, count, logits, target, *args, **kwargs)

        pl_module._as_softmax_log = log

    def _keep(self, pl_module: L.LightningModule, logits: Tensor, target: Tensor) -> None:
        self.num_classes = max(self.num_classes, logits.shape[-1] if pl_module.as_softmax_multilabel or logits.dim() == 1 else logits.shape[1])
        if pl_module.as_softmax_multilabel:
            self.predictions.append((logits > 0).long().reshape(-1, logits.shape[-1]).cpu())
            self.targets.append(target.long().reshape(-1, logits.shape[-1]).cpu())
            return
        predicted = logits.argmax(dim=1) if logits.dim() > 1 else logits.argmax().reshape(1)
        predicted, target = predicted.reshape(-1), target.reshape(-1)
        kept = target != pl_module.as_softmax_ignore_index
        self.predictions.append(predicted[kept].cpu())
        self.targets.append(target[kept].cpu())

    def _unwrap(self, pl_module: L.LightningModule) -> None:
        pl_module.__dict__.pop("_as_softmax_log", None)

    def on_test_start(self, trainer, pl_module) -> None:
        self._wrap(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._unwrap(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._wrap(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._unwrap(pl_module)

    def scores(self, multilabel: bool) -> dict[str, Any]:
        """``acc`` (micro) and ``macro_f1`` of what was captured (torchmetrics), with the
        predictions and targets as lists (single-label)."""
        from torchmetrics.functional.classification import (
            multiclass_accuracy,
            multiclass_f1_score,
            multilabel_accuracy,
            multilabel_f1_score,
        )

        if not self.predictions:
            return {"acc": math.nan, "macro_f1": math.nan, "predictions": [], "targets": []}
        predictions, targets = torch.cat(self.predictions), torch.cat(self.targets)
        num_classes = self.num_classes
        if multilabel:
            return {
                "acc": float(multilabel_accuracy(predictions, targets, num_classes, average="micro")),
                "macro_f1": float(multilabel_f1_score(predictions, targets, num_classes, average="macro")),
                "predictions": [],
                "targets": [],
            }
        return {
            "acc": float(multiclass_accuracy(predictions, targets, num_classes, average="micro")),
            "macro_f1": float(multiclass_f1_score(predictions, targets, num_classes, average="macro")),
            "predictions": predictions.tolist(),
            "targets": targets.tolist(),
        }
