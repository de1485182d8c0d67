r"""Dense members: plain softmax cross entropy, its temperature form and label smoothing.

With logits :math:`z`, target :math:`t` and :math:`C` classes:

- ``softmax``: :math:`\ell = \log\sum_i e^{z_i} - z_t` (``F.cross_entropy``).
- ``t_softmax``: the same on :math:`z / T`.
- ``label_smoothing`` (Szegedy et al., 2016): cross entropy against the target
  :math:`(1 - \varepsilon)\,\mathbf{1}_t + \varepsilon / C`, i.e.
  :math:`(1 - \varepsilon)\,(-\log p_t) + \frac{\varepsilon}{C}\sum_i (-\log p_i)`.

None of them reaches an exact zero loss on finite logits, so none reports masked samples.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_assoftmax.family.base import FamilyLoss
from lightning_assoftmax.functional._checks import check_real

__all__ = ["LabelSmoothingLoss", "SoftmaxLoss", "TemperatureSoftmaxLoss"]


class SoftmaxLoss(FamilyLoss):
    """Plain softmax cross entropy, the baseline every other member is compared with.

    Example:
        >>> import torch
        >>> SoftmaxLoss()(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, -100]))
        tensor(0.1269)
    """

    name = "softmax"

    def row_losses(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, reduction="none")


class TemperatureSoftmaxLoss(FamilyLoss):
    r"""Softmax cross entropy of ``logits / temperature`` (t-softmax).

    The model's predicted distribution is :math:`\mathrm{softmax}(z / T)`, so that is also what
    :meth:`predictive_logits` returns. ``temperature=1`` is plain softmax.

    Args:
        temperature: :math:`T > 0`. The default 2.0 is this package's choice, not a published
            setting: tune it on your task.
    """

    name = "t_softmax"

    def __init__(self, temperature: float = 2.0, *, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.temperature = check_real(
            temperature, "t_softmax: temperature", low=0.0, hint="Use 1.0 for plain softmax."
        )

    def predictive_logits(self, logits: Tensor) -> Tensor:
        return logits / self.temperature

    def row_losses(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits / self.temperature, target, reduction="none")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"


class LabelSmoothingLoss(FamilyLoss):
    r"""Cross entropy against a smoothed target (Szegedy et al., CVPR 2016, arXiv 1512.00567).

    Args:
        smoothing: :math:`\varepsilon` in ``[0, 1)``, the probability mass spread uniformly over
            all classes (the common setting is 0.1; 0 is plain softmax).
    """

    name = "label_smoothing"

    def __init__(self, smoothing: float = 0.1, *, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.smoothing = check_real(
            smoothing,
            "label_smoothing: smoothing",
            low=0.0,
            high=1.0,
            low_inclusive=True,
            hint="The usual value is 0.1; 0 is plain softmax.",
        )

    def row_losses(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing, reduction="none")

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, {super().extra_repr()}"
