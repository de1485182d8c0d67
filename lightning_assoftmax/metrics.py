"""torchmetrics form of the masked-sample ratio (stateful, DDP-synchronised by summing counts)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_assoftmax.functional import (
    as_softmax_loss_and_stats,
    multilabel_as_softmax_loss_and_stats,
)
from lightning_assoftmax.functional._checks import check_delta, check_flag, check_ignore_index

__all__ = ["MaskedSampleRatio", "WeightedMean"]


class MaskedSampleRatio(Metric):
    r"""Share of samples whose AS-Softmax loss is exactly zero, accumulated over batches.

    .. math:: \rho = \frac{\#\{\text{non-ignored samples with } \ell = 0\}}{\#\{\text{non-ignored samples}\}}

    The counts are summed across batches and, under DDP, across processes, so the ratio is the one
    of the union of all samples seen (not a mean of per-batch ratios). 0 when nothing was counted.

    Args:
        delta: the AS-Softmax margin in ``[0, 1]``.
        ignore_index: target value excluded from both counts (single-label only).
        multilabel: treat ``target`` as 0/1 labels shaped like ``logits``.

    Example:
        >>> import torch
        >>> metric = MaskedSampleRatio(delta=0.1)
        >>> metric.update(torch.tensor([[4.0, 0.0], [0.0, 0.1]]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([[0.0, 5.0]]), torch.tensor([-100]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    masked: Tensor
    total: Tensor

    def __init__(self, delta: float = 0.1, ignore_index: int = -100, multilabel: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delta = check_delta(delta)
        self.ignore_index = check_ignore_index(ignore_index)
        self.multilabel = check_flag(
            "multilabel", multilabel, " Use multilabel=True for 0/1 targets shaped like the logits."
        )
        self.add_state("masked", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        with torch.no_grad():
            if self.multilabel:
                _, masked, total = multilabel_as_softmax_loss_and_stats(
                    logits, target, self.delta, reduction="sum"
                )
            else:
                _, masked, total = as_softmax_loss_and_stats(
                    logits, target, self.delta, ignore_index=self.ignore_index, reduction="sum"
                )
        self.masked += masked.to(self.masked.device)
        self.total += total.to(self.total.device)

    def compute(self) -> Tensor:
        return self.masked.float() / self.total.clamp(min=1).float()


class WeightedMean(Metric):
    """Exact weighted mean ``sum(value * weight) / sum(weight)`` whose NaN values are kept.

    The mixin's logged epoch values use it: a NaN loss must show in the logs. (torchmetrics'
    ``MeanMetric(nan_strategy="disable")`` keeps NaN but, in torchmetrics 1.9, also drops the
    weights.) States are sums, so DDP synchronisation gives the mean over all processes' samples.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    weighted_sum: Tensor
    weight: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("weighted_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.weighted_sum.dtype, device=self.device)
        weight = torch.as_tensor(weight, dtype=self.weight.dtype, device=self.device)
        self.weighted_sum += (value * weight).sum()
        self.weight += weight.sum()

    def compute(self) -> Tensor:
        return self.weighted_sum / self.weight
