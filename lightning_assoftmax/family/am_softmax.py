r"""Additive-margin softmax (Wang et al., "Additive Margin Softmax for Face Verification",
IEEE Signal Processing Letters 2018, arXiv 1801.05599) and the cosine classifier head it needs.

The head outputs cosines :math:`c_i = \cos\theta_i = \hat w_i^\top \hat x` (unit-normalised
weights and features). The loss subtracts a margin :math:`m` from the target cosine and scales by
:math:`s`:

.. math:: \ell(c, t) = -\log \frac{e^{s (c_t - m)}}{e^{s (c_t - m)} + \sum_{i \ne t} e^{s c_i}} .

The model predicts with :math:`\mathrm{softmax}(s\,c)` (no margin at test time), which is what
:meth:`AMSoftmaxLoss.predictive_logits` returns; the argmax is that of the cosines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.family.margin import (
    CosineMarginLoss,
    check_margin,
    target_column,
    with_target_column,
)

__all__ = ["AMSoftmaxLoss", "CosFaceLoss", "CosineClassifier"]


class CosineClassifier(nn.Module):
    """Linear classifier over unit vectors: ``(..., in_features) -> (..., num_classes)`` cosines.

    Both the input features and the class weights are L2-normalised, so every output lies in
    ``[-1, 1]``; this is the head :class:`AMSoftmaxLoss` expects. It has no bias (a bias would
    break the cosine reading).

    Example:
        >>> import torch
        >>> head = CosineClassifier(8, 3)
        >>> bool(head(torch.randn(4, 8)).abs().max() <= 1 + 1e-6)
        True
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        for what, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CosineClassifier: {what} must be a positive int, got {value!r}.")
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same start as nn.Linear; only the directions of the rows matter afterwards.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, features: Tensor) -> Tensor:
        return F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class AMSoftmaxLoss(CosineMarginLoss):
    r"""Additive-margin softmax over cosine logits in ``[-1, 1]`` (Wang et al., 2018).

    Feed it the output of :class:`CosineClassifier` (``classifier_head(..., loss="am_softmax")``
    builds one). Logits outside ``[-1, 1]`` raise an error, since raw linear logits train a
    different, unbounded objective.

    Args:
        scale: :math:`s > 0` (paper: 30).
        margin: :math:`m \ge 0` subtracted from the target cosine (paper: 0.35).
        delta: ``None`` (default), or the AS-Softmax margin applied to the margin logits
            :math:`s (c - m\,\mathbf{1}_t)` (see :class:`~lightning_assoftmax.family.MarginLoss`).

    Example:
        >>> import torch
        >>> loss = AMSoftmaxLoss(scale=30.0, margin=0.35)
        >>> cosines = torch.tensor([[0.5, 0.3, -0.1]])  # target 0 trails class 1 once the margin is off
        >>> loss(cosines, torch.tensor([0]))  # log(1 + e^(9 - 4.5) + e^(-3 - 4.5))
        tensor(4.5111)
    """

    name = "am_softmax"
    scale_hint = "The paper uses 30."

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.35,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(scale, delta=delta, ignore_index=ignore_index, reduction=reduction)
        self.margin = check_margin(margin, f"{self.name}: margin", "The paper uses 0.35.")

    def margin_logits(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        return self.scale * with_target_column(logits, target, target_column(logits, target) - self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, {super().extra_repr()}"


class CosFaceLoss(AMSoftmaxLoss):
    r"""CosFace (Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR
    2018, arXiv 1801.09414): the same loss as :class:`AMSoftmaxLoss`, :math:`s(\cos\theta_t - m)`
    for the target, published at the same time; ``build_loss("cosface")`` is an alias with the
    same defaults (the CosFace paper trains faces with :math:`s = 64`, :math:`m = 0.35`).
    """

    name = "cosface"
