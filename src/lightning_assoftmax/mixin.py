"""``ASSoftmaxMixin``: the AS-Softmax loss and its metrics inside any ``LightningModule``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.functional import (
    as_softmax_loss_and_stats,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)
from lightning_assoftmax.functional._checks import check_delta
from lightning_assoftmax.metrics import WeightedMean

__all__ = ["ASSoftmaxMixin"]

_STAGE_KEYS = {"train": ("loss", "masked_ratio"), "val": ("loss", "masked_ratio", "ce_loss", "acc")}
_STAGE_KEYS["test"] = _STAGE_KEYS["val"]


class ASSoftmaxMixin:
    """Adds ``as_softmax_loss(logits, target)`` and its logging to a ``LightningModule``.

    List the mixin *before* ``LightningModule`` and pass ``delta`` through ``super().__init__``::

        class MyModel(ASSoftmaxMixin, L.LightningModule):
            def __init__(self, hidden: int = 64, delta: float = 0.1):
                super().__init__(delta=delta)
                self.save_hyperparameters()
                ...

            def training_step(self, batch, batch_idx):
                x, y = batch
                return self.as_softmax_loss(self(x), y)

    In a running ``Trainer`` the method logs ``<stage>/loss`` and ``<stage>/masked_ratio`` for
    ``train`` (per step and per epoch), ``val`` and ``test`` (per epoch), plus ``<stage>/ce_loss``
    (plain cross entropy on the same logits) and ``<stage>/acc`` in validation and test. Epoch
    values are exact means over all non-ignored samples of all processes (torchmetrics states).

    Args:
        delta: the AS-Softmax margin in ``[0, 1]`` (paper: 0.1; 1 is plain cross entropy).
        multilabel: targets are 0/1 tensors shaped like the logits (multi-label AS-Softmax); the
            logged ``acc`` is then label-wise accuracy at the score threshold 0 and ``ce_loss``
            the unmasked multi-label base loss.
        ignore_index: target value to skip (single-label only).

    Attributes:
        as_softmax_delta: the delta used for the *training* loss; ``DeltaWarmup`` moves it.
        as_softmax_target_delta: the configured delta, used for validation and test losses so
            that their values stay comparable across epochs.
        as_softmax_last_stats: ``(masked_count, valid_count)`` of the latest training batch
            (0-dim tensors), read by ``AdaptiveGradAccumulation``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        modules = [i for i, base in enumerate(mro) if base is nn.Module]
        if modules and mro.index(ASSoftmaxMixin) > modules[0]:
            raise TypeError(
                f"{cls.__name__}: list ASSoftmaxMixin before LightningModule in the base classes, "
                f"e.g. `class {cls.__name__}(ASSoftmaxMixin, L.LightningModule)`, so that its "
                "keyword arguments (delta, ...) are consumed before nn.Module.__init__."
            )

    def __init__(
        self, *args: Any, delta: float = 0.1, multilabel: bool = False, ignore_index: int = -100, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.as_softmax_target_delta = check_delta(delta)
        self.as_softmax_delta = self.as_softmax_target_delta
        self.as_softmax_multilabel = bool(multilabel)
        self.as_softmax_ignore_index = int(ignore_index)
        self.as_softmax_last_stats: tuple[Tensor, Tensor] | None = None
        self.as_softmax_metrics = nn.ModuleDict(
            {
                f"{stage}_{key}": WeightedMean()
                for stage, keys in _STAGE_KEYS.items()
                for key in keys
            }
        )

    # -- public API -------------------------------------------------------------------------
    def as_softmax_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The (mean) AS-Softmax loss of a batch; logs it when called inside a ``Trainer`` loop.

        Shapes as ``F.cross_entropy``: logits ``(N, C)`` or ``(N, C, d1, ...)``, target ``(N)`` or
        ``(N, d1, ...)``; for ``multilabel=True`` the target is 0/1 shaped like the logits.
        """
        stage = self._as_softmax_stage()
        delta = self.as_softmax_delta if stage in (None, "train") else self.as_softmax_target_delta
        if self.as_softmax_multilabel:
            loss, masked, count = multilabel_as_softmax_loss_and_stats(logits, target, delta)
        else:
            loss, masked, count = as_softmax_loss_and_stats(
                logits, target, delta, ignore_index=self.as_softmax_ignore_index
            )
        if stage == "train":
            self.as_softmax_last_stats = (masked, count)
        if stage is not None:
            self._as_softmax_log(stage, loss, masked, count, logits, target)
        return loss

    # -- internals --------------------------------------------------------------------------
    def _as_softmax_stage(self) -> str | None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return None
        if trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        if trainer.testing:
            return "test"
        return None

    @torch.no_grad()
    def _as_softmax_plain_stats(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Summed plain loss and the number of correct predictions (for ce_loss and acc)."""
        if self.as_softmax_multilabel:
            ce = multilabel_as_softmax_loss(logits, target, 1.0, reduction="sum")
            correct = ((logits > 0) == (target > 0.5)).float().mean(dim=1).sum()
            return ce, correct
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ce = F.cross_entropy(
            logits.to(compute), target, ignore_index=self.as_softmax_ignore_index, reduction="sum"
        )
        valid = target != self.as_softmax_ignore_index
        correct = ((logits.argmax(dim=1) == target) & valid).sum()
        return ce, correct

    def _as_softmax_log(
        self, stage: str, loss: Tensor, masked: Tensor, count: Tensor, logits: Tensor, target: Tensor
    ) -> None:
        if int(count) == 0:  # an all-ignored batch adds nothing to a mean
            return
        weight = count.float()
        values = {"loss": loss.detach(), "masked_ratio": masked.float() / weight}
        if stage != "train":
            ce_sum, correct = self._as_softmax_plain_stats(logits.detach(), target)
            values["ce_loss"] = ce_sum / weight
            values["acc"] = correct.float() / weight
        on_step = stage == "train"
        for key, value in values.items():
            metric = self.as_softmax_metrics[f"{stage}_{key}"]
            metric(value.float(), weight)
            self.log(
                f"{stage}/{key}",
                metric,
                on_step=on_step,
                on_epoch=True,
                prog_bar=key in ("loss", "acc", "masked_ratio"),
                batch_size=int(count),
            )
