r"""``MarginAnnealing``: the annealing of L-Softmax's and SphereFace's weight :math:`\lambda`."""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_assoftmax.callbacks._checks import require_mixin
from lightning_assoftmax.functional._checks import check_real

__all__ = ["MarginAnnealing"]


class MarginAnnealing(Callback):
    r"""Lowers the ``lam`` of an ``l_softmax`` or ``sphereface`` loss as training proceeds.

    Both papers train from a large :math:`\lambda`, where the target's logit is nearly the plain
    one (softmax converges), towards the margin loss. After :math:`s` optimizer steps

    .. math:: \lambda(s) = \max\bigl(\lambda^*,\ \lambda_0\,(1 + \gamma s)^{-p}\bigr),

    the schedule of the SphereFace authors' released training (``base`` :math:`\lambda_0 = 1000`,
    ``gamma`` :math:`\gamma = 0.12`, ``power`` :math:`p = 1`, floor 5), where the floor
    :math:`\lambda^*` is the ``lam`` the loss was configured with (``loss_kwargs={"lam": 5}`` for
    that schedule; the default 0 anneals towards the loss as written), read from the module's
    ``loss_kwargs`` (or the loss's default), never from the loss's current ``lam``. Validation and
    test use :math:`\lambda^*`, so that their losses stay comparable across epochs. The loss gets
    :math:`\lambda^*` back when training ends, also when it ends with an exception (an
    out-of-memory error caught in a notebook, an interrupt): a later fit starts the same schedule
    as a fresh one. Logs ``train/margin_lambda``. The step count is ``trainer.global_step``, so a
    resumed run continues the schedule where it stopped.

    With :math:`\gamma = 0.12` the weight reaches 100 after 75 steps, 10 after 825 and 5 after
    about 1660: lower ``base`` or raise ``gamma`` for short runs.

    Args:
        base: :math:`\lambda_0 > 0`, the weight at step 0.
        gamma: :math:`\gamma \ge 0` (0 keeps :math:`\lambda_0` throughout).
        power: :math:`p > 0`.
    """

    def __init__(self, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0) -> None:
        self.base = check_real(base, "MarginAnnealing: base", low=0.0, hint="It is lambda at step 0, e.g. 1000.")
        self.gamma = check_real(gamma, "MarginAnnealing: gamma", low=0.0, low_inclusive=True)
        self.power = check_real(power, "MarginAnnealing: power", low=0.0)
        self._target: float | None = None

    def lam_at(self, step: int, target: float) -> float:
        """The scheduled :math:`\\lambda` after ``step`` optimizer steps, floored at ``target``."""
        return max(target, self.base * (1.0 + self.gamma * step) ** (-self.power))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_mixin(pl_module, "MarginAnnealing")
        criterion = getattr(pl_module, "as_softmax_criterion", None)
        if criterion is None or not hasattr(criterion, "lam"):
            loss = getattr(pl_module, "as_softmax_loss_name", "as_softmax")
            raise ValueError(
                f"MarginAnnealing schedules the weight lam of the l_softmax and sphereface losses, but "
                f"{type(pl_module).__name__} trains with loss={loss!r}, which has none. Remove the "
                "callback for this run or use loss='l_softmax' / 'sphereface'."
            )
        self._target = _configured_lam(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        lam = self.lam_at(trainer.global_step, self._target)
        pl_module.as_softmax_criterion.lam = lam
        # A CPU tensor: Lightning would copy a Python float to the module's device at every batch.
        pl_module.log("train/margin_lambda", torch.tensor(lam), on_step=True, on_epoch=False, batch_size=1)

    def _restore(self, pl_module: Any) -> None:
        if self._target is not None:
            pl_module.as_softmax_criterion.lam = self._target

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._restore(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._restore(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore(pl_module)


def _configured_lam(pl_module: Any) -> float:
    """The floor: ``lam`` in the module's ``loss_kwargs``, else the loss's default; never the loss's
    current ``lam``, which an earlier fit stopped by an exception may have left annealed."""
    kwargs = getattr(pl_module, "as_softmax_loss_kwargs", None) or {}
    if "lam" in kwargs:
        return float(kwargs["lam"])
    return float(inspect.signature(type(pl_module.as_softmax_criterion)).parameters["lam"].default)
