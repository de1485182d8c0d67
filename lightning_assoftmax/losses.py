"""``nn.Module`` forms of the AS-Softmax losses (thin wrappers over :mod:`.functional`)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_loss_and_stats,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)
from lightning_assoftmax.functional._checks import check_delta, check_ignore_index, check_reduction

__all__ = ["ASSoftmaxLoss", "MultiLabelASSoftmaxLoss"]


class ASSoftmaxLoss(nn.Module):
    """Adaptive Sparse Softmax cross entropy; a drop-in for ``nn.CrossEntropyLoss``.

    Args:
        delta: margin in ``[0, 1]`` (``1`` is plain cross entropy). Mutable: ``loss.delta = 0.2``.
        ignore_index: target value to skip (default -100, as ``nn.CrossEntropyLoss``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Shapes: logits ``(N, C)`` or ``(N, C, d1, ...)``; target ``(N)`` or ``(N, d1, ...)``.

    Example:
        >>> import torch
        >>> criterion = ASSoftmaxLoss(delta=0.1)
        >>> criterion(torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0]))
        tensor(0.)
    """

    # The softmax-family interface (see lightning_assoftmax.family.FamilyLoss).
    name = "as_softmax"
    produces_masked_samples = True

    def __init__(self, delta: float = 0.1, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.delta = check_delta(delta)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return as_softmax_cross_entropy(
            logits, target, self.delta, ignore_index=self.ignore_index, reduction=self.reduction
        )

    def loss_and_stats(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The loss plus ``(masked_count, valid_count)`` (see ``as_softmax_loss_and_stats``).

        The counts are what ``AdaptiveGradAccumulation`` reads from a ``training_step`` that
        returns ``{"loss": loss, "masked_count": masked, "valid_count": valid}``.
        """
        return as_softmax_loss_and_stats(
            logits, target, self.delta, ignore_index=self.ignore_index, reduction=self.reduction
        )

    def predictive_logits(self, logits: Tensor) -> Tensor:
        """Prediction is unchanged by the mask: the raw logits."""
        return logits

    def extra_repr(self) -> str:
        return f"delta={self.delta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class MultiLabelASSoftmaxLoss(nn.Module):
    """Multi-label AS-Softmax loss over ``(N, C)`` scores and 0/1 targets of the same shape.

    Example:
        >>> import torch
        >>> criterion = MultiLabelASSoftmaxLoss(delta=0.1)
        >>> criterion(torch.tensor([[5.0, -5.0, -5.0]]), torch.tensor([[1, 0, 0]]))
        tensor(0.)
    """

    def __init__(self, delta: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.delta = check_delta(delta)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return multilabel_as_softmax_loss(logits, target, self.delta, reduction=self.reduction)

    def loss_and_stats(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The loss plus ``(masked_count, row_count)``: rows whose loss is exactly 0, and all rows
        (see ``multilabel_as_softmax_loss_and_stats``)."""
        return multilabel_as_softmax_loss_and_stats(logits, target, self.delta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"delta={self.delta}, reduction={self.reduction!r}"
