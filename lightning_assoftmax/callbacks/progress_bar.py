"""``CompactProgressBar``: Lightning's progress bar with the bundle's metric names shortened."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["CompactProgressBar", "compact_metric_name"]

_WORDS = {"masked_ratio": "masked", "ce_loss": "ce"}


def compact_metric_name(name: str) -> str:
    """A progress-bar name for a logged key: ``train/masked_ratio_step`` -> ``masked``,
    ``train/loss_epoch`` -> ``loss_ep``, ``val/masked_ratio`` -> ``val_masked``.

    The training keys lose their ``train/`` prefix and ``_step`` suffix (the bar is the training
    bar); other stages keep their name as a prefix. Keys without a stage are left alone.
    """
    stage, sep, key = name.partition("/")
    if not sep:
        return name
    suffix = ""
    for ending, short in (("_step", ""), ("_epoch", "_ep")):
        if key.endswith(ending):
            key, suffix = key[: -len(ending)], short
            break
    key = _WORDS.get(key, key)
    return f"{key}{suffix}" if stage == "train" else f"{stage}_{key}{suffix}"


class CompactProgressBar(TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` that shows the logged keys by short
    names (:func:`compact_metric_name`), so ``train/masked_ratio`` is not cut off on an 80-column
    terminal. The logged keys themselves (loggers, ``metrics.csv``, callbacks) are unchanged.

    The ``lightning-assoftmax`` command uses it unless a progress bar is configured or
    ``enable_progress_bar`` is false; add it to a ``Trainer`` of your own with
    ``callbacks=[CompactProgressBar()]``.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        short: dict[str, Any] = {}
        for name, value in items.items():
            short.setdefault(compact_metric_name(name), value)
        return short
