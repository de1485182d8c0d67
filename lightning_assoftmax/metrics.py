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

    ``update`` also takes the counts a loss call has already produced
    (``update(masked_count=m, valid_count=v)``), so the ratio logged beside a loss comes from that
    very loss call; ``ASSoftmaxMixin`` feeds it that way.

    Example:
        >>> import torch
        >>> metric = MaskedSampleRatio(delta=0.1)
        >>> metric.update(torch.tensor([[4.0, 0.0], [0.0, 0.1]]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([[0.0, 5.0]]), torch.tensor([-100]))
        >>> metric.compute()
        tensor(0.5000)
        >>> metric.update(masked_count=torch.tensor(2), valid_count=torch.tensor(2))
        >>> metric.compute()
        tensor(0.7500)
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

    def update(
        self,
        logits: Tensor | None = None,
        target: Tensor | None = None,
        *,
        masked_count: Tensor | None = None,
        valid_count: Tensor | None = None,
    ) -> None:
        """Add a batch: its ``(logits, target)``, or the counts a loss call already returned.

        ``masked_count`` and ``valid_count`` (0-dim integer tensors, e.g. from
        :func:`~lightning_assoftmax.functional.as_softmax_loss_and_stats` or
        ``ASSoftmaxLoss.loss_and_stats``) spare a second pass over the logits; ``delta``,
        ``ignore_index`` and ``multilabel`` then play no part.
        """
        counts = masked_count is not None or valid_count is not None
        if counts == (logits is not None or target is not None) or (
            counts and (masked_count is None or valid_count is None)
        ):
            raise TypeError(
                "MaskedSampleRatio.update takes either (logits, target) or both masked_count= and "
                "valid_count= (0-dim integer tensors from a loss call's loss_and_stats), not a mix."
            )
        if counts:
            masked, total = torch.as_tensor(masked_count), torch.as_tensor(valid_count)
        else:
            with torch.no_grad():
                if self.multilabel:
                    _, masked, total = multilabel_as_softmax_loss_and_stats(
                        logits, target, self.delta, reduction="sum"
                    )
                else:
                    _, masked, total = as_softmax_loss_and_stats(
                        logits, target, self.delta, ignore_index=self.ignore_index, reduction="sum"
                    )
        self.masked += masked.to(self.masked.device, torch.long).reshape(())
        self.total += total.to(self.total.device, torch.long).reshape(())

    def compute(self) -> Tensor:
        return self.masked.float() / self.total.clamp(min=1).float()


class WeightedMean(Metric):
    """Exact weighted mean ``sum(value * weight) / sum(weight)`` whose NaN values are kept.

    The mixin's logged loss values use it: a NaN loss must show in the logs. (torchmetrics'
    ``MeanMetric(nan_strategy="disable")`` keeps NaN but, in torchmetrics 1.9, also drops the
    weights.) States are sums, so DDP synchronisation gives the mean over all processes' samples.
    With no weight at all (e.g. only ignored targets) the mean is 0, like the loss of such a batch.
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
        # torch.where rather than a Python test on the weight: no host-device synchronisation.
        return torch.where(self.weight > 0, self.weighted_sum / self.weight, torch.zeros_like(self.weighted_sum))
