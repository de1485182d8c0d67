r"""L2-constrained softmax (Ranjan, Castillo & Chellappa, "L2-constrained Softmax Loss for
Discriminative Face Verification", arXiv 1703.09507).

The features are rescaled to a fixed norm :math:`\alpha` before the last linear layer, so every
sample, easy or hard, gets logits of the same magnitude. The head
(:class:`~lightning_assoftmax.family.NormalizedFeatureClassifier`) outputs
:math:`o = W\hat x + b` of the unit feature :math:`\hat x = x / \|x\|`; the loss is the cross
entropy of :math:`\alpha\,o`, which is also the model's predicted distribution.
"""

from __future__ import annotations

from torch import Tensor

from lightning_assoftmax.family.margin import MarginLoss
from lightning_assoftmax.functional._checks import check_real

__all__ = ["L2SoftmaxLoss"]


class L2SoftmaxLoss(MarginLoss):
    r"""Cross entropy of :math:`\alpha\,(W\hat x + b)`, the output of
    ``classifier_head(in_features, num_classes, loss="l2_softmax")`` scaled by :math:`\alpha`.

    Args:
        alpha: the feature norm :math:`\alpha > 0`. The paper bounds it from below by
            :math:`\log(p\,(C - 2) / (1 - p))` for a wanted probability :math:`p` of the target
            (about 5.7 for :math:`p = 0.99` and :math:`C = 5`) and trains faces with 16 to 50;
            the default 30 is the scale of the rest of this family.
        delta: ``None`` or the AS-Softmax margin applied to :math:`\alpha\,o`.

    Example:
        >>> import torch
        >>> L2SoftmaxLoss(alpha=2.0)(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))  # log(e^2 + 1) - 2
        tensor(0.1269)
    """

    name = "l2_softmax"

    def __init__(
        self,
        alpha: float = 30.0,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(delta=delta, ignore_index=ignore_index, reduction=reduction)
        self.alpha = check_real(
            alpha, f"{self.name}: alpha", low=0.0, hint="It is the norm the features are rescaled to, e.g. 30."
        )

    def predictive_logits(self, logits: Tensor) -> Tensor:
        return self.alpha * logits

    def margin_logits(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        return self.alpha * logits

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"
