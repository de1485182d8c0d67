"""``PredictionWriter``: predictions of ``Trainer.predict`` as a CSV or JSON Lines file with label names."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

__all__ = ["PredictionWriter"]

_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PredictionWriter(BasePredictionWriter):
    """Writes one row per predicted sample: its id, its text, the predicted label and its probability.

    Columns (CSV) or keys (JSON Lines): ``id`` (the sample's index in the prediction set), ``text``
    (when the datamodule has ``predict_texts``, as the bundled text datamodules do), ``label`` (the
    predicted class name), ``probability`` (its probability) and, with ``top_k > 1``,
    ``top_labels`` / ``top_probabilities`` (the ``top_k`` most probable classes, most probable
    first; joined by ``|`` in CSV, lists in JSON Lines). For multi-label models ``label`` holds
    every class whose probability exceeds 0.5 (``|``-joined in CSV, a list in JSON Lines) and
    ``probability`` their probabilities.

    Class names come from the model's ``class_names`` (saved in its checkpoint by the ready-made
    models), else the datamodule's, else the class index. Probabilities come from the model's
    ``class_probabilities(batch)`` (N, C) when it has one; otherwise the output of
    ``predict_step`` is written as is (``label``: the value, e.g. a class index per sample or the
    token ids of a sequence) with no probability.

    Rows are written as batches end (nothing is kept in memory) on rank 0 only; under DDP each
    rank's samples would be a subset, so use one device to predict.

    Args:
        output: file to write, ``.csv`` or ``.jsonl``; a relative path lies in ``trainer.log_dir``
            (``default_root_dir`` without a logger).
        top_k: how many of the most probable classes to list besides the prediction (1: none).

    Attributes:
        path: where the file was written (``None`` before ``predict``).
        rows: rows written by the latest ``predict``.
    """

    def __init__(self, output: str = "predictions.csv", top_k: int = 1) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(output, (str, os.PathLike)) or not str(output):
            raise TypeError(f"output must be a file name ending in .csv or .jsonl, got {output!r}.")
        suffix = os.path.splitext(str(output))[1].lower()
        if suffix not in _FORMATS:
            raise ValueError(
                f"output {str(output)!r} must end in .csv or .jsonl (the file format), e.g. 'predictions.csv'."
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 (1: only the predicted label), got {top_k!r}.")
        self.output = str(output)
        self.format = _FORMATS[suffix]
        self.top_k = top_k
        self.path: str | None = None
        self.rows = 0
        self._handle: Any = None
        self._csv: Any = None
        self._names: list[str] | None = None
        self._texts: Sequence[str] | None = None

    # -- Lightning hooks --------------------------------------------------------------------
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # collective under DDP: every rank makes the call
        self.rows = 0
        if not trainer.is_global_zero:
            return
        path = self.output if os.path.isabs(self.output) else os.path.join(log_dir or trainer.default_root_dir, self.output)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._names = _class_names(trainer, pl_module)
        self._texts = getattr(trainer.datamodule, "predict_texts", None) if trainer.datamodule is not None else None
        self._handle = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in on_predict_end
        self._csv = csv.writer(self._handle) if self.format == "csv" else None
        if self._csv is not None:
            header = ["id"] + (["text"] if self._texts else []) + ["label", "probability"]
            if self.top_k > 1:
                header += ["top_labels", "top_probabilities"]
            self._csv.writerow(header)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._handle is None:
            return
        probabilities = None
        if callable(getattr(pl_module, "class_probabilities", None)):
            with torch.no_grad():
                probabilities = pl_module.class_probabilities(batch).float().cpu()
        size = len(probabilities) if probabilities is not None else len(prediction)
        ids = list(batch_indices) if batch_indices else list(range(self.rows, self.rows + size))
        multilabel = bool(getattr(pl_module, "as_softmax_multilabel", False))
        for row in range(size):
            record: dict[str, Any] = {"id": int(ids[row])}
            if self._texts:
                record["text"] = self._texts[ids[row]]
            if probabilities is None:
                value = prediction[row]
                record["label"] = value.tolist() if isinstance(value, Tensor) else value
                record["probability"] = None
            else:
                record.update(self._describe(probabilities[row], multilabel))
            self._write(record)
        self.rows += size

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = self._csv = None
        rank_zero_info(f"PredictionWriter: {self.rows} predictions written to {self.path}")

    # -- internals --------------------------------------------------------------------------
    def _name(self, index: int) -> str:
        return self._names[index] if self._names is not None else str(index)

    def _describe(self, probabilities: Tensor, multilabel: bool) -> dict[str, Any]:
        if multilabel:
            chosen = torch.nonzero(probabilities > 0.5).flatten().tolist()
            record: dict[str, Any] = {
                "label": [self._name(i) for i in chosen],
                "probability": [round(float(probabilities[i]), 6) for i in chosen],
            }
        else:
            best = int(probabilities.argmax())
            record = {"label": self._name(best), "probability": round(float(probabilities[best]), 6)}
        if self.top_k > 1:
            values, indices = probabilities.topk(min(self.top_k, len(probabilities)))
            record["top_labels"] = [self._name(i) for i in indices.tolist()]
            record["top_probabilities"] = [round(float(v), 6) for v in values]
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if self._csv is None:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        cells = []
        for value in record.values():
            if isinstance(value, list):
                value = "|".join(map(str, value))
            cells.append("" if value is None else value)
        self._csv.writerow(cells)


def _class_names(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str] | None:
    for owner in (pl_module, trainer.datamodule):
        names = getattr(owner, "class_names", None)
        if names is not None:
            return [str(name) for name in names]
    return None
