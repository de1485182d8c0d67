r"""Sparse-softmax (Sun et al., "Sparse-softmax: A Simpler and Faster Alternative Softmax
Transformation", arXiv 2112.12433).

With :math:`\Omega_k` the indices of the :math:`k` largest logits, the transformation keeps only
those classes, :math:`p_i = e^{z_i} / \sum_{j \in \Omega_k} e^{z_j}` for :math:`i \in \Omega_k`
and 0 elsewhere, and the training loss is

.. math:: \ell(z, t) = \log \sum_{i \in \Omega_k} e^{z_i} - z_t .

As in the paper, :math:`\Omega_k` is chosen from the logits alone: the target is *not* added to it.
A target outside the top :math:`k` still gets a finite, positive loss (the log-sum is at least the
largest logit, which exceeds :math:`z_t`), and its gradient is :math:`-1` on :math:`z_t` and the
softmax over :math:`\Omega_k` on the top-:math:`k` logits, so the target is pulled up into the set.
With :math:`k \ge C` this is plain cross entropy. With :math:`k = 1` it is :math:`\max_i z_i - z_t`,
exactly 0 (with a zero gradient) once the target is the argmax, so only ``k=1`` reports masked
samples.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_assoftmax.family.base import FamilyLoss
from lightning_assoftmax.functional._checks import check_positive_int

__all__ = ["SparseSoftmaxLoss"]


class SparseSoftmaxLoss(FamilyLoss):
    """Top-``k`` sparse-softmax cross entropy (Sun et al., arXiv 2112.12433).

    Args:
        k: how many of the largest logits enter the softmax. The paper tunes it per task and
            aims at many classes (hundreds or more); the default 10 is this package's choice.
            ``k`` at or above the number of classes gives plain cross entropy (with a warning).

    Example:
        >>> import torch
        >>> loss = SparseSoftmaxLoss(k=2, reduction="none")
        >>> loss(torch.tensor([[3.0, 1.0, 0.0, -9.0]]), torch.tensor([0]))  # log(e^3 + e^1) - 3
        tensor([0.1269])
    """

    name = "sparse_softmax"

    def __init__(self, k: int = 10, *, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.k = check_positive_int(k, "sparse_softmax: k", hint="k=1 keeps only the largest logit.")

    @property
    def produces_masked_samples(self) -> bool:  # type: ignore[override]
        return self.k == 1

    def row_losses(self, logits: Tensor, target: Tensor) -> Tensor:
        num_classes = logits.shape[1]
        if self.k >= num_classes and num_classes > 1:
            warnings.warn(
                f"sparse_softmax: k={self.k} keeps all {num_classes} classes, so the loss is plain "
                f"softmax cross entropy; pass k < {num_classes} (e.g. loss_kwargs={{'k': "
                f"{max(1, num_classes // 2)}}}) to compare a sparse variant.",
                stacklevel=4,
            )
        top = logits.topk(min(self.k, num_classes), dim=1).values
        return torch.logsumexp(top, dim=1) - logits.gather(1, target.unsqueeze(1)).squeeze(1)

    def extra_repr(self) -> str:
        return f"k={self.k}, {super().extra_repr()}"
