"""What the bundle's callbacks read from a training step: the masked and valid counts of its loss.

Lightning's channel from ``training_step`` to callbacks is the step's output, which reaches
``on_train_batch_end`` as ``outputs``. A ``training_step`` that returns
``{"loss": loss, "masked_count": m, "valid_count": v}`` (0-dim integer tensors, e.g. from
``ASSoftmaxLoss.loss_and_stats`` or ``as_softmax_loss_and_stats``) works with any module;
``ASSoftmaxMixin`` modules that return a bare loss are read from their
``as_softmax_last_stats`` instead. Further per-sample fields can join the same dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

__all__ = ["MASKED_COUNT", "VALID_COUNT", "training_step_counts"]

MASKED_COUNT = "masked_count"
VALID_COUNT = "valid_count"


def training_step_counts(pl_module: pl.LightningModule, outputs: Any) -> tuple[Tensor, Tensor] | None:
    """``(masked_count, valid_count)`` of the training batch that just ended, or ``None``.

    Taken from the ``training_step`` output when it holds both keys, else from an
    ``ASSoftmaxMixin`` module's ``as_softmax_last_stats`` (its ``log=True`` loss call of the
    batch). The values stay tensors on their device: reading them costs no synchronisation.

    Raises:
        TypeError: an output count that is not an integer tensor.
    """
    if isinstance(outputs, Mapping) and MASKED_COUNT in outputs and VALID_COUNT in outputs:
        counts = outputs[MASKED_COUNT], outputs[VALID_COUNT]
        for key, value in zip((MASKED_COUNT, VALID_COUNT), counts, strict=True):
            if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex() or value.dim() != 0:
                raise TypeError(
                    f"training_step returned {key}={value!r}; it must be a 0-dim integer tensor, e.g. "
                    "`loss, masked, valid = ASSoftmaxLoss(delta).loss_and_stats(logits, target)` and "
                    '`return {"loss": loss, "masked_count": masked, "valid_count": valid}`.'
                )
        return counts
    from lightning_assoftmax.mixin import ASSoftmaxMixin

    if isinstance(pl_module, ASSoftmaxMixin):
        return pl_module.as_softmax_last_stats
    return None
