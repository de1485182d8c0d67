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
    multilabel_as_softmax_rows,
)

__all__ = [
    "multilabel_as_softmax_keep_mask",
    "multilabel_as_softmax_loss",
    "multilabel_as_softmax_loss_and_flags",
    "multilabel_as_softmax_loss_and_stats",
    "multilabel_masked_sample_ratio",
]


def multilabel_as_softmax_loss_and_flags(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, reduction: str = "mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """The multi-label loss plus each row's masked flag and the number of rows.

    Returns:
        ``(loss, masked, row_count)``: ``masked`` is bool, one flag per row (shaped like the loss
        with ``reduction="none"``), true where the keep rule drops every term of the row (loss
        and gradient exactly 0); ``row_count`` a 0-dim ``torch.long`` tensor. Both detached.
    """
    out, masked = _loss(logits, target, delta, reduction)
    count = torch.full((), masked.shape[0], dtype=torch.long, device=masked.device)
    shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    return out, masked.reshape(shape), count


def multilabel_as_softmax_loss_and_stats(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, reduction: str = "mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """The multi-label loss plus ``(masked_count, row_count)`` (rows whose every term is masked,
    whose loss is exactly 0), both 0-dim ``torch.long`` tensors on the logits' device."""
    out, masked = _loss(logits, target, delta, reduction)
    count = torch.full((), masked.shape[0], dtype=torch.long, device=masked.device)
    return out, masked.sum(), count


def _loss(logits: Tensor, target: Tensor, delta: float, reduction: str) -> tuple[Tensor, Tensor]:
    """The reduced loss and the masked flag of each row, flat ``(M,)``."""
    fn = "multilabel_as_softmax_loss"
    delta = check_delta(delta)
    reduction = check_reduction(reduction)
    # The labels are checked by the op, on CPU only (reading them from a GPU would synchronise).
    check_multilabel_target(logits, target, fn, values=False)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    try:
        rows, _, masked = multilabel_as_softmax_rows(
            class_rows(logits), class_rows(target), delta, need_grad
        )
    except LabelsNotBinary as error:
        raise ValueError(f"{fn}: {error}") from None
    if reduction == "none":
        # A copy, not a view of the op's output: callers may weight the loss in place.
        shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
        out = rows if logits.dim() == 2 else rows.reshape(shape).clone()
    elif reduction == "sum":
        out = rows.sum()
    else:  # an empty batch gives 0, not NaN
        out = rows.sum() / max(rows.shape[0], 1)
    return out, masked


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
    keep = multilabel_as_softmax_keep(scores, class_rows(target) != 0, delta)
    return from_class_rows(keep, logits.shape)


def multilabel_masked_sample_ratio(logits: Tensor, target: Tensor, delta: float = 0.1) -> Tensor:
    """Share of rows whose every term is masked (their loss is exactly zero; 0 for an empty
    batch)."""
    with torch.no_grad():
        _, masked, count = multilabel_as_softmax_loss_and_stats(
            logits, target, delta, reduction="sum"
        )
    return masked.float() / count.clamp(min=1).float()
