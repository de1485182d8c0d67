"""``DeltaWarmup``: the paper's ``r`` schedule for the AS-Softmax margin."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_assoftmax.callbacks._checks import require_mixin
from lightning_assoftmax.functional._checks import check_real

__all__ = ["DeltaWarmup"]


class DeltaWarmup(Callback):
    r"""Moves ``as_softmax_delta`` linearly from ``start_delta`` down to the module's target delta.

    Over the first ``warmup_fraction`` (the paper's :math:`r`) of the optimizer steps that
    ``trainer.estimated_stepping_batches`` predicts, then holds the target:

    .. math:: \delta(s) = \delta_0 + (\delta^* - \delta_0)\,\min(1, s / (r\,S)).

    With ``start_delta=1`` (default) training starts as plain softmax cross entropy.
    ``warmup_fraction=0`` means no warm-up. Only the training loss follows the schedule; validation
    and test use the target delta. Logs ``train/delta``. The step count comes from
    ``trainer.global_step``, and the warm-up length :math:`r\,S`, placed when training starts, is
    saved in checkpoints: a resumed run continues the same schedule where it stopped (also when
    the estimate read at the resume would differ, e.g. with ``SkipMaskedSamples``' shorter
    epochs, or a larger ``max_epochs``).

    Note:
        ``estimated_stepping_batches`` assumes a constant ``accumulate_grad_batches``; with
        ``AdaptiveGradAccumulation`` fewer optimizer steps happen, so the warm-up lasts a larger
        share of training than ``warmup_fraction`` (it still ends at the same step).
    """

    def __init__(self, warmup_fraction: float = 0.1, start_delta: float = 1.0) -> None:
        warmup_fraction = check_real(
            warmup_fraction, "warmup_fraction", low=0.0, high=1.0, low_inclusive=True, high_inclusive=True,
            hint="It is the share of training steps spent warming up; use 0 for no warm-up.",
        )
        start_delta = check_real(
            start_delta, "start_delta", low=0.0, high=1.0, low_inclusive=True, high_inclusive=True,
            hint="It is the delta training starts from; the default 1 starts as plain softmax cross entropy.",
        )
        self.warmup_fraction = float(warmup_fraction)
        self.start_delta = float(start_delta)
        self._warmup_steps = 0.0
        self._restored_warmup_steps: float | None = None

    @property
    def warmup_steps(self) -> float:
        """Optimizer steps of the warm-up, :math:`r\\,S` (0 before training starts or without warm-up)."""
        return self._warmup_steps

    def delta_at(self, step: int, target_delta: float) -> float:
        """The scheduled delta after ``step`` optimizer steps."""
        if self._warmup_steps <= 0:
            return target_delta
        progress = min(1.0, step / self._warmup_steps)
        return self.start_delta + (target_delta - self.start_delta) * progress

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_mixin(pl_module, "DeltaWarmup")
        loss = getattr(pl_module, "as_softmax_loss_name", "as_softmax")
        if loss != "as_softmax":
            criterion = getattr(pl_module, "as_softmax_criterion", None)
            why = (
                "whose delta (set in loss_kwargs) stays fixed"
                if hasattr(criterion, "delta")
                else "which has no delta"
            )
            raise ValueError(
                f"DeltaWarmup schedules the AS-Softmax margin delta, but {type(pl_module).__name__} "
                f"trains with loss={loss!r}, {why}. Remove the callback for this run or use "
                "loss='as_softmax'."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before a checkpoint is restored: a fit that does not resume places the warm-up afresh.
        if stage == "fit":
            self._restored_warmup_steps = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_warmup_steps is not None:
            # The estimate read now is not the one the run started from: a resumed
            # SkipMaskedSamples epoch is shorter than a full one, and max_epochs may have grown.
            self._warmup_steps, self._restored_warmup_steps = self._restored_warmup_steps, None
            return
        if self.warmup_fraction == 0:
            self._warmup_steps = 0.0
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "DeltaWarmup needs a finite training length to place the warm-up: set "
                "Trainer(max_epochs=...) or Trainer(max_steps=...), or use warmup_fraction=0."
            )
        self._warmup_steps = self.warmup_fraction * float(total)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        delta = self.delta_at(trainer.global_step, pl_module.as_softmax_target_delta)
        pl_module.as_softmax_delta = delta
        # A CPU tensor: Lightning turns a Python float into a tensor on the module's device, a
        # host-to-device copy that waits for the GPU at every batch.
        pl_module.log("train/delta", torch.tensor(delta), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.as_softmax_delta = pl_module.as_softmax_target_delta

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # A fit stopped by an error (e.g. out of memory, caught in a notebook) leaves the module
        # as a finished one does.
        if hasattr(pl_module, "as_softmax_target_delta"):
            pl_module.as_softmax_delta = pl_module.as_softmax_target_delta

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_fraction": self.warmup_fraction, "start_delta": self.start_delta, "warmup_steps": self._warmup_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("warmup_fraction"), state_dict.get("start_delta"))
        if saved != (self.warmup_fraction, self.start_delta):
            rank_zero_warn(
                f"DeltaWarmup resumed with warmup_fraction={self.warmup_fraction}, start_delta={self.start_delta} "
                f"from a checkpoint made with warmup_fraction={saved[0]}, start_delta={saved[1]}: the warm-up is "
                "placed anew from the new values and this run's training length."
            )
            return
        self._restored_warmup_steps = float(state_dict["warmup_steps"])
