r"""Class-weighted softmax cross entropy ("weighted softmax loss").

Each sample's cross entropy is multiplied by the weight :math:`w_t` of its class, and the mean is
taken as ``F.cross_entropy(weight=w)`` takes it, over the weights:

.. math:: \ell = \frac{\sum_n w_{t_n}\,\ell_n}{\sum_n w_{t_n}},\qquad
          \ell_n = \log\sum_i e^{z_{n,i}} - z_{n,t_n}.

``weight="balanced"`` gives every class the same total weight on the training split (the usual
"balanced" heuristic, as in scikit-learn): :math:`w_c = n / (C\,n_c)` for :math:`n` training
samples of which :math:`n_c` belong to class :math:`c`. The counts come from
:meth:`WeightedSoftmaxLoss.set_class_counts`, ``class_counts=``, or, inside a ``Trainer``, from the
training data (see :class:`~lightning_assoftmax.ASSoftmaxMixin`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_assoftmax.family.margin import MarginLoss
from lightning_assoftmax.functional._layout import target_rows

__all__ = ["WeightedSoftmaxLoss", "balanced_class_weights", "count_class_labels"]


def balanced_class_weights(class_counts: Sequence[int] | Tensor) -> Tensor:
    """``n / (C * n_c)`` (float64, ``(C,)``) of per-class training counts ``n_c``.

    Example:
        >>> balanced_class_weights([30, 10, 20])
        tensor([0.6667, 2.0000, 1.0000], dtype=torch.float64)
    """
    counts = torch.as_tensor(class_counts).detach().cpu()
    if counts.dim() != 1 or counts.numel() == 0 or counts.is_floating_point() or counts.is_complex():
        raise ValueError(
            f"class_counts must be a non-empty 1-D sequence of integer counts, one per class, got "
            f"{class_counts!r}."
        )
    if counts.dtype == torch.bool or bool((counts < 0).any()):
        raise ValueError(f"class_counts must hold counts >= 0, got {counts.tolist()}.")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"weight='balanced' needs at least one training sample of every class, but class(es) "
            f"{empty[:10]}{'...' if len(empty) > 10 else ''} have none: their weight would be "
            "infinite. Pass explicit weights (weight=[...]) instead."
        )
    counts = counts.to(torch.float64)
    return counts.sum() / (counts.numel() * counts)


def count_class_labels(labels: Iterable[Any], num_classes: int, ignore_index: int = -100) -> Tensor:
    """Per-class counts ``(num_classes,)`` of class-index labels (ints or integer tensors of any
    shape, e.g. one per token; ``ignore_index`` entries are skipped).

    Example:
        >>> count_class_labels([0, 2, 2, -100], num_classes=3)
        tensor([1, 0, 2])
    """
    counts = torch.zeros(num_classes, dtype=torch.long)
    for label in labels:
        values = torch.as_tensor(label).reshape(-1)
        if values.is_floating_point():
            raise ValueError(f"count_class_labels expects class indices, got floating labels {values[:5].tolist()}.")
        values = values[values != ignore_index].long()
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(
                f"count_class_labels: label {values.tolist()[:5]} outside [0, {num_classes - 1}]."
            )
        counts += torch.bincount(values, minlength=num_classes)
    return counts


class WeightedSoftmaxLoss(MarginLoss):
    r"""Class-weighted cross entropy, equal to ``F.cross_entropy(logits, target, weight=w)``.

    Args:
        weight: ``"balanced"`` (default; from the training split's class counts) or one
            non-negative weight per class (a sequence or a 1-D tensor, not all zero).
        class_counts: the training split's per-class counts for ``"balanced"`` (else they are
            set later with :meth:`set_class_counts`; the mixin does so from the training data).
        delta: ``None`` or the AS-Softmax margin: the kept-class cross entropy, weighted the
            same way.

    ``reduction="mean"`` divides by the sum of the targets' weights (0 when it is 0), ``"none"``
    returns :math:`w_t \ell` per element. A zero-loss row is a masked sample whatever its weight.

    Example:
        >>> import torch
        >>> loss = WeightedSoftmaxLoss(weight=[1.0, 3.0])
        >>> loss(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]))  # both rows log 2
        tensor(0.6931)
    """

    name = "weighted_softmax"

    def __init__(
        self,
        weight: str | Sequence[float] | Tensor = "balanced",
        class_counts: Sequence[int] | Tensor | None = None,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(delta=delta, ignore_index=ignore_index, reduction=reduction)
        self.balanced = isinstance(weight, str)
        if self.balanced and weight != "balanced":
            raise ValueError(
                f"weighted_softmax: weight must be 'balanced' or one weight per class, got {weight!r}."
            )
        # Not saved in checkpoints: the weights follow from the configuration (and the data).
        self.register_buffer("class_weight", None if self.balanced else _check_weights(weight), persistent=False)
        if class_counts is not None:
            if not self.balanced:
                raise ValueError(
                    "weighted_softmax: class_counts is only used with weight='balanced'; with explicit "
                    "weights leave it out."
                )
            self.set_class_counts(class_counts)

    @property
    def needs_class_counts(self) -> bool:
        """True while ``weight="balanced"`` still lacks the training split's class counts."""
        return self.balanced and self.class_weight is None

    def set_class_counts(self, class_counts: Sequence[int] | Tensor) -> None:
        """Set the balanced weights from the training split's per-class counts ``(C,)``."""
        if not self.balanced:
            raise ValueError("weighted_softmax: set_class_counts applies to weight='balanced' only.")
        device = None if self.class_weight is None else self.class_weight.device
        self.class_weight = balanced_class_weights(class_counts).to(device=device)

    def margin_logits(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        return logits

    def _check_rows(self, logits: Tensor) -> None:
        if self.class_weight is None:
            raise ValueError(
                "weighted_softmax with weight='balanced' needs the training split's class counts: pass "
                "class_counts=[...] (one count per class), call loss.set_class_counts(counts), or train "
                "inside a Trainer with ASSoftmaxMixin, which counts the training labels."
            )
        if self.class_weight.numel() != logits.shape[1]:
            raise ValueError(
                f"weighted_softmax has {self.class_weight.numel()} class weights but the logits have "
                f"{logits.shape[1]} classes; give one weight (or count) per class."
            )

    def mean_weight(self, target: Tensor) -> Tensor:
        """The sum of the non-ignored targets' class weights (what ``"mean"`` divides by)."""
        valid = target != self.ignore_index
        if self.class_weight is None:
            return valid.sum()
        # Ignored positions read any class's weight and are multiplied by 0 (no host sync).
        index = target.clamp(0, self.class_weight.numel() - 1)
        return (self.class_weight.to(target.device)[index] * valid).sum()

    def _reduce(self, rows: Tensor, valid: Tensor, target: Tensor) -> Tensor:
        weights = self.class_weight.to(device=rows.device, dtype=rows.dtype)[target_rows(target)[valid]]
        weighted = rows * weights
        if self.reduction == "none":
            return weighted.new_zeros(valid.shape).masked_scatter(valid, weighted).reshape(target.shape)
        total = weighted.sum()
        if self.reduction == "sum":
            return total
        norm = weights.sum()
        return total / torch.where(norm > 0, norm, torch.ones_like(norm))

    def extra_repr(self) -> str:
        weight = "'balanced'" if self.balanced else "[...]"
        return f"weight={weight}, {super().extra_repr()}"


def _check_weights(weight: Sequence[float] | Tensor) -> Tensor:
    try:
        values = torch.as_tensor(weight, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"weighted_softmax: weight must be 'balanced' or a sequence of numbers, one per class; got {weight!r}."
        ) from err
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"weighted_softmax: weight must be 1-D with one entry per class, got shape {tuple(values.shape)}.")
    bad = [v for v in values.tolist() if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"weighted_softmax: weights must be finite and >= 0, got {bad[:5]}.")
    if not bool((values > 0).any()):
        raise ValueError("weighted_softmax: at least one class weight must be positive.")
    return values
