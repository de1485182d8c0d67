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

__all__ = [
    "multilabel_as_softmax_keep_mask",
    "multilabel_as_softmax_loss",
    "multilabel_as_softmax_loss_and_stats",
    "multilabel_masked_sample_ratio",
]


def _as_rows(t: Tensor) -> Tensor:
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _keep(scores: Tensor, positive: Tensor, delta: float) -> Tensor:
    """Kept terms ``(M, C)`` for float scores and boolean positives (rows of NaN keep all)."""
    if delta >= 1.0:
        return torch.ones_like(positive)
    with torch.no_grad():
        p = torch.softmax(scores, dim=1)
        negative = ~positive
        has_pos = positive.any(dim=1, keepdim=True)
        has_neg = negative.any(dim=1, keepdim=True)
        min_pos = p.masked_fill(negative, float("inf")).amin(dim=1, keepdim=True)
        max_neg = p.masked_fill(positive, float("-inf")).amax(dim=1, keepdim=True)
        # Written as ~(gap > delta) so that NaN rows keep every term and the NaN surfaces.
        keep_neg = ~((min_pos - p) > delta) | ~has_pos
        keep_pos = ~((p - max_neg) > delta) | ~has_neg
        return torch.where(positive, keep_pos, keep_neg)


def _log1p_sum_exp(x: Tensor) -> Tensor:
    """``log(1 + sum(exp(x), dim=1))`` for rows that may be all ``-inf`` (then exactly 0)."""
    shift = x.detach().amax(dim=1, keepdim=True).clamp(min=0.0)
    # shift is a constant of the expression, so detaching it leaves the gradient exact.
    return (shift + torch.log(torch.exp(-shift) + torch.exp(x - shift).sum(dim=1, keepdim=True))).squeeze(1)


def _row_losses(logits: Tensor, target: Tensor, delta: float) -> Tensor:
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = _as_rows(logits).to(compute)
    positive = _as_rows(target) > 0.5
    keep = _keep(s, positive, delta)
    signed = torch.where(positive, -s, s)
    neg_term = _log1p_sum_exp(signed.masked_fill(~(keep & ~positive), float("-inf")))
    pos_term = _log1p_sum_exp(signed.masked_fill(~(keep & positive), float("-inf")))
    return neg_term + pos_term


def multilabel_as_softmax_loss_and_stats(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, reduction: str = "mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """The multi-label loss plus ``(masked_count, row_count)`` (rows with loss exactly 0)."""
    fn = "multilabel_as_softmax_loss"
    delta = check_delta(delta)
    reduction = check_reduction(reduction)
    check_multilabel_target(logits, target, fn)
    rows = _row_losses(logits, target, delta)
    with torch.no_grad():
        masked = (rows.detach() == 0).sum()
        count = torch.tensor(rows.shape[0], device=rows.device)
    if reduction == "none":
        out = rows.reshape(logits.shape[:1] + logits.shape[2:]) if logits.dim() > 1 else rows.reshape(())
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / max(rows.shape[0], 1)
    return out, masked, count


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
    loss, _, _ = multilabel_as_softmax_loss_and_stats(logits, target, delta, reduction=reduction)
    return loss


def multilabel_as_softmax_keep_mask(logits: Tensor, target: Tensor, delta: float = 0.1) -> Tensor:
    """Boolean mask of the kept loss terms, shaped like ``logits`` (no gradient)."""
    delta = check_delta(delta)
    check_multilabel_target(logits, target, "multilabel_as_softmax_keep_mask")
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    keep = _keep(_as_rows(logits).detach().to(compute), _as_rows(target) > 0.5, delta)
    if logits.dim() <= 2:
        return keep.reshape(logits.shape)
    return keep.reshape(logits.movedim(1, -1).shape).movedim(-1, 1)


def multilabel_masked_sample_ratio(logits: Tensor, target: Tensor, delta: float = 0.1) -> Tensor:
    """Share of rows whose multi-label AS-Softmax loss is exactly zero (0 for an empty batch)."""
    with torch.no_grad():
        _, masked, count = multilabel_as_softmax_loss_and_stats(logits, target, delta, reduction="sum")
    return masked.float() / count.clamp(min=1).float()
