r"""Multi-label AS-Softmax (SPEC section 2, "Multi-label").

Base loss per row with scores :math:`s`, positives :math:`P` and negatives :math:`Q`:

.. math:: \log\bigl(1 + \sum_{i \in Q} e^{s_i}\bigr) + \log\bigl(1 + \sum_{j \in P} e^{-s_j}\bigr).

With :math:`p = \mathrm{softmax}(s)` over all labels (no gradient), a negative :math:`i` is kept
iff :math:`\min_{j \in P} p_j - p_i \le \delta` and a positive :math:`j` iff
:math:`p_j - \max_{i \in Q} p_i \le \delta`; masked terms leave their sums. A row without
positives keeps all its negatives and a row without negatives all its positives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_assoftmax.functional._checks import (
    check_delta,
    check_multilabel_target,
    check_reduction,
)
from lightning_assoftmax.functional._layout import class_rows, from_class_rows
from lightning_assoftmax.ops import (
    LabelsNotBinary,
    compute_dtype,
    multilabel_as_softmax_keep,
    multilabel_as_softmax_rows_loss,
)

__all__ = [
    "multilabel_as_softmax_keep_mask",
    "multilabel_as_softmax_loss",
    "multilabel_as_softmax_loss_and_stats",
    "multilabel_masked_sample_ratio",
]


def _losses(logits: Tensor, target: Tensor, delta: float, reduction: str) -> tuple[Tensor, Tensor]:
    """The loss reduced by ``reduction`` and the per-row losses, for validated inputs."""
    if logits.dim() == 1:
        logits, target = logits.unsqueeze(0), target.unsqueeze(0)
    if logits.numel() == 0:
        # Stay attached to the graph: backward through an empty batch must work (zero gradient).
        rows = logits.to(compute_dtype(logits.dtype)).sum(dim=1).reshape(-1)
        return (rows if reduction == "none" else rows.sum()), rows
    if reduction == "none":
        rows = multilabel_as_softmax_rows_loss(logits, target, delta, check_labels=True)
        return rows, rows
    return multilabel_as_softmax_rows_loss(logits, target, delta, reduction, check_labels=True)


def multilabel_as_softmax_loss_and_stats(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, reduction: str = "mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """The multi-label loss plus ``(masked_count, row_count)`` (rows with loss exactly 0)."""
    out, rows = _loss(logits, target, delta, reduction)
    with torch.no_grad():
        masked = (rows.detach() == 0).sum()
        count = torch.tensor(rows.shape[0], device=rows.device)
    return out, masked, count


def _loss(logits: Tensor, target: Tensor, delta: float, reduction: str) -> tuple[Tensor, Tensor]:
    """The reduced loss and the per-row losses."""
    fn = "multilabel_as_softmax_loss"
    delta = check_delta(delta)
    reduction = check_reduction(reduction)
    # The label values are checked as the kernels read them (one pass less over the target).
    check_multilabel_target(logits, target, fn, values=False)
    try:
        out, rows = _losses(logits, target, delta, reduction)
    except LabelsNotBinary:
        check_multilabel_target(logits, target, fn)  # raises the error naming the value
        raise
    if reduction == "none":
        out = out.reshape(logits.shape[:1] + logits.shape[2:]) if logits.dim() > 1 else out.reshape(())
    return out, rows


def multilabel_as_softmax_loss(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, reduction: str = "mean"
) -> Tensor:
    r"""Multi-label AS-Softmax loss (the paper's multi-label variant of its softmax loss).

    Args:
        logits: ``(N, C)`` (or ``(N, C, d1, ...)``, labels second) raw scores; 0 is the threshold
            between "label on" and "label off".
        target: 0/1 (float, int or bool) of the same shape as ``logits``.
        delta: margin in ``[0, 1]``; ``delta=1`` gives the unmasked base loss.
        reduction: ``"mean"`` over rows, ``"sum"`` or ``"none"`` (one value per row).

    A row whose every term is masked has loss exactly 0 (and zero gradient). Unlike the reference
    code, a row without positives (or without negatives) still gets the loss of its other side.

    Example:
        >>> import torch
        >>> from lightning_assoftmax.functional import multilabel_as_softmax_loss
        >>> logits = torch.tensor([[5.0, -5.0, -5.0], [0.5, 0.0, -0.5]])
        >>> target = torch.tensor([[1, 0, 0], [1, 1, 0]])
        >>> multilabel_as_softmax_loss(logits, target, delta=0.2, reduction="none")
        tensor([0.0000, 1.1672])
    """
    return _loss(logits, target, delta, reduction)[0]


def multilabel_as_softmax_keep_mask(logits: Tensor, target: Tensor, delta: float = 0.1) -> Tensor:
    """Boolean mask of the kept loss terms, shaped like ``logits`` (no gradient)."""
    delta = check_delta(delta)
    check_multilabel_target(logits, target, "multilabel_as_softmax_keep_mask")
    scores = class_rows(logits).detach().to(compute_dtype(logits.dtype))
    keep = multilabel_as_softmax_keep(scores, class_rows(target) > 0.5, delta)
    return from_class_rows(keep, logits.shape)


def multilabel_masked_sample_ratio(logits: Tensor, target: Tensor, delta: float = 0.1) -> Tensor:
    """Share of rows whose multi-label AS-Softmax loss is exactly zero (0 for an empty batch)."""
    with torch.no_grad():
        _, masked, count = multilabel_as_softmax_loss_and_stats(
            logits, target, delta, reduction="sum"
        )
    return masked.float() / count.clamp(min=1).float()
