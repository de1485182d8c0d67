r"""Multiplicative angular margins: L-Softmax (Liu et al., "Large-Margin Softmax Loss for
Convolutional Neural Networks", ICML 2016, arXiv 1612.02295) and A-Softmax / SphereFace (Liu et
al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017, arXiv 1704.08063).

The head (:class:`~lightning_assoftmax.family.NormPreservingClassifier`) gives the margin-free
logits :math:`z_j = \|W_j\|\,\|x\|\cos\theta_j` (SphereFace: unit :math:`W_j`, no bias) with the
norms attached. The loss replaces the target's logit by

.. math:: \tilde z_t = \frac{\lambda\,\|W_t\|\|x\|\cos\theta_t + \|W_t\|\|x\|\,\psi(\theta_t)}{1 + \lambda},
   \qquad \psi(\theta) = (-1)^k \cos(m\theta) - 2k,\quad
   \theta \in \left[\tfrac{k\pi}{m}, \tfrac{(k+1)\pi}{m}\right],

for an integer margin :math:`m \ge 1` (:math:`\psi` is :math:`\cos(m\theta)` made monotonically
decreasing over :math:`[0, \pi]`; :math:`m = 1` is plain softmax). :math:`\lambda \ge 0` is the
papers' annealing weight: training starts from a large :math:`\lambda` (nearly plain softmax, which
converges) and lowers it; :math:`\lambda = 0` is the loss as written (and as
``pytorch-metric-learning`` computes it). It is the mutable attribute ``lam``;
:class:`~lightning_assoftmax.MarginAnnealing` drives it from a ``Trainer``.

:math:`\cos(m\theta)` is the Chebyshev polynomial :math:`T_m(\cos\theta)` (the papers' multiple-angle
formula), so no ``acos`` enters the gradient; :math:`k` is read off
:math:`\arccos(\mathrm{clamp}(\cos\theta, -1, 1))` without gradient. :math:`\cos\theta_t` is
:math:`z_t / (\|W_t\|\|x\|)`, computed in at least float32 and clamped to ``[-1, 1]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_assoftmax.family.classifiers import NormedLogits
from lightning_assoftmax.family.margin import MarginLoss, target_column, with_target_column
from lightning_assoftmax.functional._checks import check_positive_int, check_real

__all__ = ["LargeMarginSoftmaxLoss", "SphereFaceLoss", "angular_margin_psi"]

# A zero feature (or weight) has no angle: its cosine is taken as 0 rather than 0 / 0.
_TINY_NORM = 1e-12


def angular_margin_psi(cosine: Tensor, margin: int) -> Tensor:
    r""":math:`\psi(\theta) = (-1)^k \cos(m\theta) - 2k` of :math:`\cos\theta`, elementwise.

    Example:
        >>> import torch
        >>> # theta = 0, pi/2, pi: cos(2 theta) on [0, pi/2], then -cos(2 theta) - 2
        >>> angular_margin_psi(torch.tensor([1.0, 0.0, -1.0]), 2)
        tensor([ 1., -1., -3.])
    """
    previous, current = torch.ones_like(cosine), cosine
    for _ in range(margin - 1):  # T_{n+1}(c) = 2 c T_n(c) - T_{n-1}(c)
        previous, current = current, 2 * cosine * current - previous
    with torch.no_grad():
        angle = torch.acos(cosine.clamp(-1.0, 1.0))
        # theta = pi gives k = m, the same psi value as k = m - 1: keep k in [0, m - 1].
        k = torch.floor(angle * (margin / math.pi)).clamp(0, margin - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * current - 2.0 * k


class LargeMarginSoftmaxLoss(MarginLoss):
    r"""L-Softmax (Liu et al., ICML 2016) over the output of
    ``classifier_head(in_features, num_classes, loss="l_softmax")``.

    Args:
        margin: the integer :math:`m \ge 1` (the paper uses 2 to 4; 1 is plain softmax).
        lam: the annealing weight :math:`\lambda \ge 0` (0: the loss as written). Mutable.
        delta: ``None`` or the AS-Softmax margin applied to the margin logits.

    The logits must be the head's :class:`~lightning_assoftmax.family.NormedLogits` (passed on as
    they come, or transposed): a plain tensor has lost the norms and raises an error.

    Example:
        >>> import torch
        >>> from lightning_assoftmax.family import NormPreservingClassifier
        >>> head = NormPreservingClassifier(2, 2)
        >>> with torch.no_grad():
        ...     _ = head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> logits = head(torch.tensor([[2.0, 2.0]]))  # theta = pi/4 to both classes
        >>> # the target's logit 2 becomes |x| cos(2 * pi/4) = 0: log(e^0 + e^2) - 0
        >>> LargeMarginSoftmaxLoss(margin=2)(logits, torch.tensor([0]))
        tensor(2.1269, grad_fn=<DivBackward0>)
    """

    name = "l_softmax"
    #: whether the head must have unit class weights (SphereFace)
    unit_weights = False

    def __init__(
        self,
        margin: int = 4,
        lam: float = 0.0,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(delta=delta, ignore_index=ignore_index, reduction=reduction)
        self.margin = check_positive_int(
            margin, f"{self.name}: margin", "The margin m multiplies the angle: use an integer such as 2, 3 or 4."
        )
        self.lam = lam

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_real(
            value,
            f"{self.name}: lam",
            low=0.0,
            low_inclusive=True,
            hint="It weighs the plain target logit against the margin one; 0 is the loss as written.",
        )

    def row_inputs(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        r"""``magnitude``: :math:`\|W_t\|\,\|x\|` of each element, shaped like ``target``."""
        if not isinstance(logits, NormedLogits):
            raise ValueError(
                f"{self.name} needs the norms that its classifier head attaches to the logits; got a "
                f"plain tensor. Build the output layer with classifier_head(in_features, num_classes, "
                f"loss={self.name!r}) and pass its output to the loss as it comes (transposes and "
                "dtype casts keep the norms; other operations drop them)."
            )
        class_dim = 0 if logits.dim() == 1 else 1
        num_classes = logits.shape[class_dim]
        feature_norm = logits.feature_norm
        if feature_norm.dim() != logits.dim() or feature_norm.shape[class_dim] != 1:
            raise ValueError(
                f"{self.name}: the logits' norms have shape {tuple(feature_norm.shape)}, which does "
                f"not match logits of shape {tuple(logits.shape)}; reshape the features, not the logits."
            )
        magnitude = feature_norm.squeeze(class_dim)
        if logits.weight_norm is not None:
            if self.unit_weights:
                raise ValueError(
                    f"{self.name} needs unit-norm class weights; build the output layer with "
                    f"classifier_head(in_features, num_classes, loss={self.name!r})."
                )
            index = target.clamp(0, num_classes - 1)  # ignored positions: any class, dropped later
            magnitude = magnitude * logits.weight_norm.reshape(-1)[index]
        return {"magnitude": magnitude}

    def margin_logits(self, logits: Tensor, target: Tensor, magnitude: Tensor) -> Tensor:
        plain = target_column(logits, target)
        cosine = (plain / magnitude.clamp_min(_TINY_NORM)).clamp(-1.0, 1.0)
        margin = magnitude * angular_margin_psi(cosine, self.margin)
        return with_target_column(logits, target, (self._lam * plain + margin) / (1.0 + self._lam))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, lam={self._lam}, {super().extra_repr()}"


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    r"""A-Softmax / SphereFace (Liu et al., CVPR 2017): L-Softmax with unit class weights and no
    bias, over the output of ``classifier_head(in_features, num_classes, loss="sphereface")``,
    whose logits are :math:`\|x\|\cos\theta_j`; the target's is :math:`\|x\|\psi(\theta_t)`.

    Args:
        margin: the integer :math:`m \ge 1` (paper: 4).
        lam: the annealing weight :math:`\lambda \ge 0`; the authors' released training anneals
            it from 1000 down to 5 (see :class:`~lightning_assoftmax.MarginAnnealing`). Mutable.
        delta: ``None`` or the AS-Softmax margin applied to the margin logits.
    """

    name = "sphereface"
    unit_weights = True
