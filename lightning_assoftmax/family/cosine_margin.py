r"""NormFace and ArcFace: losses over the cosines of a
:class:`~lightning_assoftmax.family.CosineClassifier` (unit features, unit class weights).

With :math:`c_i = \cos\theta_i` the head's cosines, target :math:`t` and scale :math:`s`:

- ``normface`` (Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM
  2017, arXiv 1704.06369): cross entropy of :math:`s\,c`, no margin.
- ``arcface`` (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019, arXiv 1801.07698): the target's angle grows by :math:`m`,
  :math:`\tilde z_t = s \cos(\theta_t + m)`, others :math:`s\,c_i`. Past
  :math:`\theta_t + m > \pi` the cosine would rise again (a larger angle would be rewarded), so
  there the target logit is :math:`s(c_t - m \sin m)` instead, the fallback of the published
  implementation (insightface), which pytorch-metric-learning also uses. It decreases in
  :math:`\theta_t` but is not continuous with the margin branch: at :math:`\theta_t = \pi - m`
  it lies :math:`s(\cos m + m \sin m - 1)` below it (:math:`0.117\,s` at :math:`m = 0.5`).

``cosface`` / ``am_softmax`` (additive cosine margin) live in :mod:`.am_softmax`.
:math:`\cos(\theta + m) = c\cos m - \sqrt{1 - c^2}\,\sin m` is computed without ``acos``; the
square root's argument is clamped away from 0, where its derivative is infinite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_assoftmax.family.margin import (
    CosineMarginLoss,
    check_margin,
    target_column,
    with_target_column,
)

__all__ = ["ArcFaceLoss", "NormFaceLoss"]

# sin(theta) = sqrt(1 - c^2) is clamped to at least sqrt of this: a finite gradient at c = +-1.
_MIN_SINE_SQUARED = 1e-12


class NormFaceLoss(CosineMarginLoss):
    r"""Softmax cross entropy of scaled cosines :math:`s\,c` (NormFace, Wang et al., 2017).

    Args:
        scale: :math:`s > 0`. NormFace learns it or fixes it well above 1 (cosines alone cannot
            make a confident softmax); the default 30 is ``am_softmax``'s, so that the family's
            rows differ by their margins only. ``pytorch-metric-learning``'s
            ``NormalizedSoftmaxLoss(temperature=T)`` is ``scale = 1 / T``.
        delta: ``None`` or the AS-Softmax margin applied to :math:`s\,c`.

    Example:
        >>> import torch
        >>> loss = NormFaceLoss(scale=10.0)
        >>> loss(torch.tensor([[0.5, 0.3, -0.1]]), torch.tensor([0]))  # log(e^5 + e^3 + e^-1) - 5
        tensor(0.1291)
    """

    name = "normface"
    scale_hint = "NormFace needs a scale well above 1; 30 is this family's default."

    def __init__(
        self,
        scale: float = 30.0,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(scale, delta=delta, ignore_index=ignore_index, reduction=reduction)

    def margin_logits(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        return self.scale * logits


class ArcFaceLoss(CosineMarginLoss):
    r"""Additive angular margin over cosine logits (ArcFace, Deng et al., 2019).

    Args:
        scale: :math:`s > 0` (paper: 64 for face identities; default 30, ``am_softmax``'s).
        margin: :math:`m \in [0, \pi)` in radians, added to the target's angle (paper: 0.5).
            ``pytorch-metric-learning``'s ``ArcFaceLoss`` takes it in degrees (its 28.6 is 0.5 rad).
        delta: ``None`` or the AS-Softmax margin applied to the margin logits.

    Example:
        >>> import math, torch
        >>> loss = ArcFaceLoss(scale=10.0, margin=0.5, reduction="none")
        >>> c = math.cos(1.0)  # target angle 1 rad, the margin makes it 1.5 rad
        >>> loss(torch.tensor([[c, 0.0]]), torch.tensor([0]))  # log(e^(10 cos 1.5) + 1) - 10 cos 1.5
        tensor([0.4007])
    """

    name = "arcface"
    scale_hint = "The paper uses 64; this family's default is 30."

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.5,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(scale, delta=delta, ignore_index=ignore_index, reduction=reduction)
        self.margin = check_margin(
            margin, f"{self.name}: margin", "It is an angle in radians; the paper uses 0.5.", high=math.pi
        )

    def margin_logits(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        cosine = target_column(logits, target).clamp(-1.0, 1.0)
        sine = (1.0 - cosine * cosine).clamp_min(_MIN_SINE_SQUARED).sqrt()
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        shifted = cosine * cos_m - sine * sin_m  # cos(theta + m)
        # theta + m <= pi  <=>  cos(theta) >= cos(pi - m) = -cos(m)
        target_logit = torch.where(cosine >= -cos_m, shifted, cosine - self.margin * sin_m)
        return self.scale * with_target_column(logits, target, target_logit)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, {super().extra_repr()}"
