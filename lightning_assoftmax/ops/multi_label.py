r"""Multi-label AS-Softmax rows: loss, gradient and masked flag, as a custom op.

Per row with scores :math:`s`, positives :math:`P`, negatives :math:`Q` and
:math:`p = \mathrm{softmax}(s)` (no gradient): a negative is kept iff
:math:`p_i \ge \min_P p - \delta` and a positive iff :math:`p_j \le \max_Q p + \delta` (all
negatives when :math:`P` is empty, all positives when :math:`Q` is). The loss is

.. math:: \log\bigl(1 + \sum_{i \in Q\ \mathrm{kept}} e^{s_i}\bigr)
          + \log\bigl(1 + \sum_{j \in P\ \mathrm{kept}} e^{-s_j}\bigr),

each term a log-sum-exp over ``{0}`` and the kept exponents, shifted by the group's largest
kept exponent. A row whose every term is dropped has loss exactly 0 and gradient exactly 0 (a
*masked sample*).

:func:`multilabel_as_softmax_forward_rows` is the one implementation (plain torch, any device);
the custom op ``lightning_assoftmax::multilabel_as_softmax_rows`` wraps it for eager mode and
``torch.compile`` alike. Nothing here synchronises a device with the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_assoftmax.ops._autograd import register_row_autograd
from lightning_assoftmax.ops.single_label import compute_dtype

__all__ = [
    "LabelsNotBinary",
    "check_binary_labels",
    "first_non_binary",
    "multilabel_as_softmax_forward_rows",
    "multilabel_as_softmax_keep",
    "multilabel_as_softmax_rows",
]


class LabelsNotBinary(ValueError):
    """A multi-label target holds a value other than 0 and 1."""


def first_non_binary(target: Tensor) -> str | None:
    """The first entry of ``target`` other than 0 and 1, printed as the shortest decimal that
    reads back as the same value in its dtype (``0.7``, ``0.99999994``), or ``None``.

    Reads the values on the host: call it for CPU tensors only (on a GPU it would synchronise).
    """
    if target.dtype == torch.bool or target.numel() == 0:
        return None
    flat = target.reshape(-1)
    bad = (flat != 0) & (flat != 1)  # NaN is neither
    if not bool(bad.any()):
        return None
    value = flat[bad][0]
    number = value.item()
    if not isinstance(number, float):
        return repr(number)
    for digits in range(1, 18):
        text = f"{number:.{digits}g}"
        if torch.tensor(float(text), dtype=value.dtype) == value:
            return text
    return repr(number)


def check_binary_labels(target: Tensor) -> None:
    """Raise :class:`LabelsNotBinary` naming the first label other than 0 and 1, if any."""
    bad = first_non_binary(target)
    if bad is not None:
        raise LabelsNotBinary(
            f"multi-label target must contain only 0 and 1, found {bad}. "
            "Threshold soft labels first (e.g. `(target > 0.5).float()`)."
        )


def _kept(p: Tensor, pos: Tensor, neg: Tensor, delta: float) -> Tensor:
    """The multi-label decision on probabilities ``p`` ``(M, C)``: 1.0 for kept terms, else 0.0.

    ``pos`` and ``neg`` are the 0/1 float indicators of the positives and negatives (floats keep
    the arithmetic vectorised; boolean selects cost several times more on CPU). A negative is
    kept iff ``p >= min_P p - delta`` and a positive iff ``p <= max_Q p + delta``; a row without
    positives keeps every negative, one without negatives every positive. NaN rows keep every
    term, so their NaN surfaces.
    """
    num_pos = pos.sum(1, keepdim=True)
    min_pos = torch.add(p, neg, alpha=2.0).amin(1, keepdim=True)  # negatives read as p + 2 > 1
    max_neg = (p * neg).amax(1, keepdim=True)  # positives read as 0 <= p
    low = torch.where(num_pos > 0, min_pos - delta, -1.0)
    high = torch.where(num_pos < p.shape[1], max_neg + delta, 2.0)
    dropped = torch.lt(p, low, out=torch.empty_like(p)).mul_(neg)
    dropped.addcmul_(torch.gt(p, high, out=torch.empty_like(p)), pos)
    return dropped.neg_().add_(1.0)


def multilabel_as_softmax_keep(scores: Tensor, positive: Tensor, delta: float) -> Tensor:
    """Kept terms ``(M, C)`` for float ``scores`` rows and boolean ``positive`` (no gradient)."""
    with torch.no_grad():
        p = torch.softmax(scores, dim=1, dtype=compute_dtype(scores.dtype))
        pos = positive.to(p.dtype)
        return _kept(p, pos, 1.0 - pos, delta) != 0


def multilabel_as_softmax_forward_rows(
    logits: Tensor, target: Tensor, delta: float, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row multi-label AS-Softmax loss, its gradient and the masked flag, in plain torch.

    Args:
        logits: ``(M, C)`` scores, any float dtype, any device.
        target: ``(M, C)`` 0/1 labels (bool, integer or float; not checked here).
        delta: margin in ``[0, 1]``.
        need_grad: also compute the gradient (else an empty tensor is returned in its place).

    Returns:
        ``loss`` ``(M,)`` in float32 (float64 for float64 logits); ``grad`` ``(M, C)`` in the
        logits' dtype; ``masked`` ``(M,)`` bool, the rows whose loss is exactly 0 (never a NaN
        row).
    """
    cdtype = compute_dtype(logits.dtype)
    s = logits.to(cdtype)
    positive = target != 0
    pos = positive.to(cdtype)
    neg = 1.0 - pos
    p = torch.softmax(s, 1)
    kept = _kept(p, pos, neg, delta)
    # The exponent of each term: s on negatives, -s on positives (a product with the sign, not a
    # sum with a masked term, so that an infinite score stays out of the other group).
    x = s * (neg - pos)
    # Each group's log(1 + sum e^x) is shifted by its largest kept exponent, at least 0 (the 1).
    # p grows with s, so when a group keeps any term it keeps its largest exponent: the group's
    # maximum (taken over the group, since p may tie at 0 where s does not). A group that keeps
    # nothing is shifted by 0, so an all-dropped row gives log(1) = 0 exactly.
    num_kept_neg = (kept * neg).sum(1, keepdim=True)
    num_kept_pos = (kept * pos).sum(1, keepdim=True)
    top_neg = torch.where(positive, -math.inf, x).amax(1, keepdim=True)
    top_pos = torch.where(positive, x, -math.inf).amax(1, keepdim=True)
    shift_neg = torch.where(num_kept_neg > 0, top_neg, 0.0).clamp(min=0.0)
    shift_pos = torch.where(num_kept_pos > 0, top_pos, 0.0).clamp(min=0.0)
    # Dropped terms are clamped before exp so that none overflows on its way to 0.
    shift = torch.addcmul(shift_neg * neg, shift_pos, pos)
    e = x.sub_(shift).clamp_(max=0.0).exp_().mul_(kept)
    denom_neg = torch.exp(-shift_neg) + (e * neg).sum(1, keepdim=True)
    denom_pos = torch.exp(-shift_pos) + (e * pos).sum(1, keepdim=True)
    loss = torch.add(
        (shift_neg + denom_neg.log()).squeeze(1), (shift_pos + denom_pos.log()).squeeze(1)
    )
    masked = loss == 0
    if not need_grad:
        return loss, logits.new_empty(0), masked
    # d/ds_i = e_i / denom_neg on kept negatives, -e_j / denom_pos on kept positives; a row with
    # loss exactly 0 gets gradient exactly 0, not round-off.
    nonzero = (~masked).unsqueeze(1)
    inv_neg = torch.where(nonzero, denom_neg.reciprocal(), 0.0)
    inv_pos = torch.where(nonzero, denom_pos.reciprocal(), 0.0)
    grad = e.mul_(torch.addcmul(inv_neg * neg, inv_pos, pos, value=-1.0))
    return loss, grad.to(logits.dtype).contiguous(), masked


@torch.library.custom_op("lightning_assoftmax::multilabel_as_softmax_rows", mutates_args=())
def multilabel_as_softmax_rows(
    logits: Tensor, target: Tensor, delta: float, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`multilabel_as_softmax_forward_rows` as a custom op (differentiable in ``logits``).

    Labels are checked on CPU (:class:`LabelsNotBinary`); on other devices checking them would
    synchronise with the host, so there any non-zero label counts as positive.
    """
    if target.device.type == "cpu":
        check_binary_labels(target)
    return multilabel_as_softmax_forward_rows(logits, target, delta, need_grad)


@multilabel_as_softmax_rows.register_fake
def _(logits: Tensor, target: Tensor, delta: float, need_grad: bool):
    rows = logits.shape[0]
    loss = logits.new_empty(rows, dtype=compute_dtype(logits.dtype))
    grad = logits.new_empty(logits.shape if need_grad else (0,))
    return loss, grad, logits.new_empty(rows, dtype=torch.bool)


register_row_autograd(multilabel_as_softmax_rows, "multilabel_as_softmax_loss")
