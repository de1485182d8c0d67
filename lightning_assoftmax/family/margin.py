r"""The large-margin family's shared base: a logit transform, then (optionally) the AS-Softmax
keep mask, then cross entropy.

Every member maps the output of its classifier head to *margin logits* :math:`\tilde z` (the
target's logit penalised by a margin, the rows rescaled) and trains the cross entropy of those:

.. math:: \ell(z, t) = \log \sum_i e^{\tilde z_i} - \tilde z_t .

With ``delta`` set, the cross entropy is AS-Softmax's instead (Lv et al., TASLP 2025): classes
whose probability under :math:`\mathrm{softmax}(\tilde z)` trails the target's by more than
``delta`` leave the sum, so a sample whose margin is already won by ``delta`` against every other
class gets an exact zero loss and gradient (a *masked sample*). The margin is applied first, so
the mask is decided on the margin logits: only the strong opponents *after* the margin stay in the
sum. The keep mask and the loss come from :func:`~lightning_assoftmax.functional.as_softmax_cross_entropy`,
the package's one AS-Softmax implementation; ``delta=1`` keeps every class and gives the margin
loss exactly.

Prediction never sees the margin: :meth:`MarginLoss.predictive_logits` maps the head's output to
the logits of the model's predicted distribution (a positive rescaling of the head's output, so
the argmax is the head's).
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_assoftmax.family.base import FamilyLoss
from lightning_assoftmax.functional._checks import check_delta, check_real
from lightning_assoftmax.functional.single_label import as_softmax_loss_and_flags

__all__ = ["CosineMarginLoss", "MarginLoss"]

# Cosines computed in half precision can overshoot 1 by a few ulps; raw logits overshoot by far more.
_COSINE_SLACK = 1e-2


class MarginLoss(FamilyLoss):
    """Base of the large-margin losses: :meth:`margin_logits`, then cross entropy (AS-Softmax's
    with ``delta``).

    Args:
        delta: ``None`` (default) for plain cross entropy of the margin logits, or the AS-Softmax
            margin in ``[0, 1]`` applied to them. Mutable (``loss.delta = 0.2``).
        ignore_index, reduction: as :class:`~lightning_assoftmax.family.FamilyLoss`.

    Samples that reach an exact zero loss are counted (``produces_masked_samples``) only when
    ``delta`` is set.
    """

    def __init__(self, *, delta: float | None = None, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self.delta = delta

    @property
    def delta(self) -> float | None:
        return self._delta

    @delta.setter
    def delta(self, value: float | None) -> None:
        self._delta = None if value is None else check_delta(value)

    @property
    def produces_masked_samples(self) -> bool:  # type: ignore[override]
        return self._delta is not None

    @abc.abstractmethod
    def margin_logits(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        """The logits cross entropy is taken of: ``(M, C)`` rows, target ``(M,)`` -> ``(M, C)``."""

    def row_losses(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        return self.row_losses_and_masked(logits, target, **inputs)[0]

    def row_losses_and_masked(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The rows' losses and masked flags; with ``delta`` both come from AS-Softmax's keep
        rule on the margin logits (a row is masked when only its target is kept)."""
        margin = self.margin_logits(logits, target, **inputs)
        if self._delta is None:
            rows = F.cross_entropy(margin, target, reduction="none")
            return rows, torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        rows, masked, _ = as_softmax_loss_and_flags(margin, target, self._delta, reduction="none")
        return rows, masked

    def extra_repr(self) -> str:
        return f"delta={self._delta}, {super().extra_repr()}"


class CosineMarginLoss(MarginLoss):
    r"""Base of the losses over cosine logits :math:`c_i = \cos\theta_i \in [-1, 1]` (the output of
    :class:`~lightning_assoftmax.family.CosineClassifier`), scaled by :math:`s`.

    The predicted distribution is :math:`\mathrm{softmax}(s\,c)`. Logits outside ``[-1, 1]``
    raise an error, since raw linear logits would train a different, unbounded objective.

    Args:
        scale: :math:`s > 0`.
        delta, ignore_index, reduction: as :class:`MarginLoss`.
    """

    #: the scale's default, quoted in the error message of a bad value
    scale_hint = ""

    def __init__(
        self, scale: float, *, delta: float | None = None, ignore_index: int = -100, reduction: str = "mean"
    ) -> None:
        super().__init__(delta=delta, ignore_index=ignore_index, reduction=reduction)
        self.scale = check_real(scale, f"{self.name}: scale", low=0.0, hint=self.scale_hint)

    def predictive_logits(self, logits: Tensor) -> Tensor:
        return self.scale * logits

    def _check_rows(self, logits: Tensor) -> None:
        if logits.numel() == 0:
            return
        largest = float(logits.detach().abs().amax())  # NaN compares False: it reaches the loss
        if largest > 1.0 + _COSINE_SLACK:
            raise ValueError(
                f"{self.name} expects cosine logits in [-1, 1], got a logit of magnitude {largest:.4g}. "
                "Give the model a cosine head: lightning_assoftmax.CosineClassifier(in_features, "
                f"num_classes), or classifier_head(in_features, num_classes, loss={self.name!r})."
            )

    def extra_repr(self) -> str:
        return f"scale={self.scale}, {super().extra_repr()}"


def check_margin(value: float, what: str, hint: str, high: float = math.inf) -> float:
    """A margin: a number in ``[0, high)``."""
    return check_real(value, what, low=0.0, high=high, low_inclusive=True, hint=hint)


def target_column(logits: Tensor, target: Tensor) -> Tensor:
    """``logits[i, target[i]]`` of ``(M, C)`` rows: ``(M,)``."""
    return logits.gather(1, target.unsqueeze(1)).squeeze(1)


def with_target_column(logits: Tensor, target: Tensor, values: Tensor) -> Tensor:
    """A copy of ``(M, C)`` rows whose target entries are ``values (M,)`` (differentiable in both)."""
    return logits.scatter(1, target.unsqueeze(1), values.unsqueeze(1).to(logits.dtype))
