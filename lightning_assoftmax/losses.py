"""``nn.Module`` forms of the AS-Softmax losses (thin wrappers over :mod:`.functional`)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_loss_and_stats,
    linear_as_softmax_loss_and_stats,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)
from lightning_assoftmax.functional._checks import check_delta, check_ignore_index, check_reduction
from lightning_assoftmax.functional.linear import linear_as_softmax_loss_and_flags
from lightning_assoftmax.functional.multi_label import multilabel_as_softmax_loss_and_flags
from lightning_assoftmax.functional.single_label import as_softmax_loss_and_flags

__all__ = ["ASSoftmaxLoss", "LinearASSoftmaxLoss", "MultiLabelASSoftmaxLoss"]


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

    def loss_and_flags(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The loss plus each element's masked flag (bool, shaped like ``target``) and the number
        of non-ignored elements (see ``as_softmax_loss_and_flags``)."""
        return as_softmax_loss_and_flags(
            logits, target, self.delta, ignore_index=self.ignore_index, reduction=self.reduction
        )

    def predictive_logits(self, logits: Tensor) -> Tensor:
        """Prediction is unchanged by the mask: the raw logits."""
        return logits

    def extra_repr(self) -> str:
        return f"delta={self.delta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class LinearASSoftmaxLoss(nn.Module):
    """The output layer and the AS-Softmax loss fused: ``loss(input, weight, target, bias)``.

    The module form of :func:`~lightning_assoftmax.functional.linear_as_softmax_cross_entropy`
    (as Liger-Kernel's fused linear cross entropy, it takes the layer's weight rather than owning
    it): equal to ``ASSoftmaxLoss(delta)(F.linear(input, weight, bias), target)`` for
    ``(N, d)`` input, without ever forming the ``(N, V)`` logits of the whole batch.

    Args:
        delta: margin in ``[0, 1]`` (``1`` is plain cross entropy). Mutable.
        ignore_index: target value to skip.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        chunk_size: rows of logits formed at once (``None``: from a memory budget).

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(16, 1000)
        >>> criterion = LinearASSoftmaxLoss(delta=0.1)
        >>> hidden, target = torch.randn(8, 16), torch.randint(0, 1000, (8,))
        >>> criterion(hidden, head.weight, target, head.bias).shape
        torch.Size([])
    """

    def __init__(
        self,
        delta: float = 0.1,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.delta = check_delta(delta)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_reduction(reduction)
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.loss_and_stats(input, weight, target, bias)[0]

    def loss_and_stats(
        self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The loss plus ``(masked_count, valid_count)``, 0-dim long tensors."""
        return linear_as_softmax_loss_and_stats(
            input, weight, target, bias, self.delta,
            ignore_index=self.ignore_index, reduction=self.reduction, chunk_size=self.chunk_size,
        )

    def loss_and_flags(
        self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The loss plus each position's masked flag (bool, shaped like ``target``) and the
        number of non-ignored positions."""
        return linear_as_softmax_loss_and_flags(
            input, weight, target, bias, self.delta,
            ignore_index=self.ignore_index, reduction=self.reduction, chunk_size=self.chunk_size,
        )

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
        """The loss plus ``(masked_count, row_count)``: rows whose every term is masked, and all
        rows (see ``multilabel_as_softmax_loss_and_stats``)."""
        return multilabel_as_softmax_loss_and_stats(logits, target, self.delta, reduction=self.reduction)

    def loss_and_flags(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The loss plus each row's masked flag and the number of rows (see
        ``multilabel_as_softmax_loss_and_flags``)."""
        return multilabel_as_softmax_loss_and_flags(logits, target, self.delta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"delta={self.delta}, reduction={self.reduction!r}"
