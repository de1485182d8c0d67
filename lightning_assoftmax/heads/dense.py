r"""``DenseHead``: a linear layer over all ``V`` classes and any loss of the softmax family.

The baseline the other heads are measured against: every row scores every class. ``delta`` applies
AS-Softmax to the full logits (``as_softmax_cross_entropy``), exactly as the losses of
:mod:`lightning_assoftmax.functional` do. Self-normalisation (Devlin et al., ACL 2014; the
"z-loss") adds :math:`\alpha (\log Z)^2` per row, :math:`\log Z = \operatorname{logsumexp}(z)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_assoftmax.family import build_loss, check_loss_name, classifier_head
from lightning_assoftmax.functional._checks import check_real
from lightning_assoftmax.functional.single_label import as_softmax_loss_and_flags
from lightning_assoftmax.heads.base import PREDICT_BLOCK, OutputHead, compute_dtype

__all__ = ["DenseHead"]

#: Losses that ``delta`` turns into AS-Softmax (the others are different losses altogether).
DELTA_LOSSES = ("softmax", "as_softmax")


class DenseHead(OutputHead):
    r"""``nn.Linear`` (a cosine classifier for ``am_softmax``) plus a softmax-family loss.

    Args:
        in_features: width of the hidden states.
        num_classes: number of classes ``V``.
        loss: a :func:`~lightning_assoftmax.build_loss` name (default plain ``softmax``).
        loss_kwargs: keywords of that loss (not ``ignore_index`` or ``reduction``).
        bias: a bias per class (ignored by the cosine classifier).
        z_loss: weight :math:`\alpha` of the self-normalisation penalty; 0 disables it.

    ``loss(hidden, target, delta=d)`` is ``as_softmax_cross_entropy`` of the logits (for
    ``loss="softmax"`` or ``"as_softmax"``); without ``delta`` it is the configured loss.
    ``loss="weighted_softmax"`` reduces as ``F.cross_entropy(weight=...)`` does: each row's loss
    (the z-loss penalty included) is multiplied by its target's class weight, and ``"mean"``
    divides by the sum of those weights (:meth:`mean_weight`), not by the number of rows.

    Example:
        >>> import torch
        >>> head = DenseHead(16, 10)
        >>> hidden, target = torch.randn(4, 16), torch.randint(0, 10, (4,))
        >>> torch.allclose(head.loss(hidden, target), F.cross_entropy(head.linear(hidden), target))
        True
    """

    name = "dense"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        loss: str = "softmax",
        loss_kwargs: Mapping[str, Any] | None = None,
        bias: bool = True,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(in_features, num_classes)
        owner = type(self).__name__
        self.loss_name = check_loss_name(loss)
        kwargs = dict(loss_kwargs or {})
        own = [key for key in ("ignore_index", "reduction") if key in kwargs]
        if own:
            raise ValueError(f"{owner}: loss_kwargs must not set {', '.join(own)}; pass them to loss() instead.")
        self.linear = classifier_head(in_features, num_classes, loss=loss, bias=bias)
        self.criterion = build_loss(loss, reduction="none", **kwargs)
        self.z_loss = check_real(z_loss, f"{owner}: z_loss", low=0.0, low_inclusive=True)

    def logits(self, hidden: Tensor) -> Tensor:
        """Scores ``(..., V)`` of every class."""
        return self.linear(hidden)

    def counts_masked(self, delta: float | None) -> bool:
        if self.z_loss:
            return False
        return delta is not None or bool(self.criterion.produces_masked_samples)

    def _check_delta(self, delta: float | None) -> float | None:
        if delta is not None and self.loss_name not in DELTA_LOSSES:
            raise ValueError(
                f"head 'dense' with loss={self.loss_name!r} takes no delta: delta applies AS-Softmax to "
                "the logits, which replaces that loss. Build the head with loss='softmax' to use delta."
            )
        return super()._check_delta(delta)

    def row_losses(self, hidden: Tensor, target: Tensor, delta: float | None) -> Tensor:
        return self.row_losses_and_masked(hidden, target, delta)[0]

    def row_losses_and_masked(self, hidden: Tensor, target: Tensor, delta: float | None) -> tuple[Tensor, Tensor]:
        logits = self.linear(hidden)
        if delta is not None:
            losses, masked, _ = as_softmax_loss_and_flags(logits, target, delta, reduction="none")
        else:
            losses, masked, _ = self.criterion.loss_and_flags(logits, target)
        if self.z_loss:
            penalty = self.z_loss * torch.logsumexp(logits.to(compute_dtype(logits.dtype)), dim=1) ** 2
            weight = self._class_weight()
            if weight is not None:  # the criterion weighted its rows; the penalty is part of them
                penalty = penalty * weight.to(device=penalty.device, dtype=penalty.dtype)[target]
            losses = losses + penalty
            masked = torch.zeros_like(masked)
        return losses, masked

    def mean_weight(self, target: Tensor, *, ignore_index: int = -100) -> Tensor:
        weight = self._class_weight()
        if weight is None:
            return super().mean_weight(target, ignore_index=ignore_index)
        valid = target != ignore_index
        # Ignored positions read any class's weight and are multiplied by 0 (no host sync).
        return (weight.to(target.device)[target.clamp(0, self.num_classes - 1)] * valid).sum()

    def _class_weight(self) -> Tensor | None:
        """The class weights ``(V,)`` of a class-weighted loss (``weighted_softmax``), else ``None``."""
        return getattr(self.criterion, "class_weight", None)

    def log_prob_rows(self, hidden: Tensor) -> Tensor:
        logits = self.linear(hidden).to(compute_dtype(hidden.dtype))
        return F.log_softmax(self.criterion.predictive_logits(logits), dim=1)

    def predict_rows(self, hidden: Tensor) -> Tensor:
        rows = max(1, PREDICT_BLOCK // self.num_classes)
        parts = [self.linear(block).argmax(dim=1) for block in hidden.split(rows)]
        return torch.cat(parts) if parts else hidden.new_empty(0, dtype=torch.long)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={self.loss_name!r}, z_loss={self.z_loss}"
