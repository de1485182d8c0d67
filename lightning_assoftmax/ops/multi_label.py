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

import torch
from torch import Tensor

from lightning_assoftmax.ops._autograd import register_row_autograd
from lightning_assoftmax.ops._layout import class_major, empty_grad, grad_layout
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


def _cutoffs(p: Tensor, pos: Tensor, neg: Tensor, delta: float, scratch: Tensor):
    """The multi-label cut-offs ``(low, high, max_neg, min_pos)``, each ``(M, 1)``: a negative is
    kept iff ``p >= low``, a positive iff ``p <= high`` (SPEC: ``min_P p - p_i <= delta`` and
    ``p_j - max_Q p <= delta``; a row without positives keeps every negative, one without
    negatives every positive).

    ``pos``/``neg`` are 0/1 float indicators; ``scratch`` is an ``(M, C)`` buffer to overwrite.
    Shifted copies of ``p`` keep each reduction exact on its own group: negatives read as
    ``p + 2 > 1`` for the minimum over positives, positives as ``p - 2 < 0`` for the maximum over
    negatives (a minimum above 1 means no positives, a maximum below 0 no negatives).
    """
    min_pos = torch.add(p, neg, alpha=2.0, out=scratch).amin(1, keepdim=True)
    max_neg = torch.add(p, pos, alpha=-2.0, out=scratch).amax(1, keepdim=True)
    low = torch.where(min_pos > 1.0, -1.0, min_pos - delta)
    high = torch.where(max_neg < 0.0, 2.0, max_neg + delta)
    return low, high, max_neg, min_pos


def _dropped(
    p: Tensor, pos: Tensor, neg: Tensor, low: Tensor, high: Tensor, out: Tensor, scratch: Tensor
) -> Tensor:
    """1.0 for the dropped terms, else 0.0, written to ``out`` (NaN entries are kept);
    ``scratch`` is an ``(M, C)`` buffer to overwrite."""
    dropped = torch.lt(p, low, out=out).mul_(neg)
    return dropped.addcmul_(torch.gt(p, high, out=scratch), pos)


def multilabel_as_softmax_keep(scores: Tensor, positive: Tensor, delta: float) -> Tensor:
    """Kept terms ``(M, C)`` for float ``scores`` rows and boolean ``positive`` (no gradient)."""
    with torch.no_grad():
        p = torch.softmax(scores, dim=1, dtype=compute_dtype(scores.dtype))
        pos = positive.to(p.dtype)
        neg = 1.0 - pos
        low, high, _, _ = _cutoffs(p, pos, neg, delta, torch.empty_like(p))
        return _dropped(p, pos, neg, low, high, torch.empty_like(p), torch.empty_like(p)) == 0


#: Subtracted from the terms of the other group for a per-group maximum: exact for scores
#: below 1e37 in magnitude, far beyond any trained model's.
_FAR = 1e37
#: Lowest exponent passed to exp (see multilabel_as_softmax_forward_rows).
_EXP_FLOOR = -80.0


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
        logits' dtype; ``masked`` ``(M,)`` bool, the rows whose every term is dropped by the keep
        rule (their loss and gradient are exactly 0; never a NaN row, and none at ``delta = 1``).
    """
    # 0/1 float indicators and a few reused (M, C) buffers: on CPU, masked selects and fresh
    # allocations (page faults) cost more than the arithmetic.
    cdtype = compute_dtype(logits.dtype)
    s = logits.to(cdtype)
    few_classes = class_major(logits)
    if few_classes:
        # Class by class in memory (see class_major); the buffers below inherit the layout.
        s = s.t().contiguous().t()
    pos = torch.ne(target, 0, out=torch.empty_like(s))
    neg = torch.eq(target, 0, out=torch.empty_like(s))
    p = torch.softmax(s.t(), 0).t() if few_classes else torch.softmax(s, 1)
    scratch = torch.empty_like(s)
    low, high, max_neg, min_pos = _cutoffs(p, pos, neg, delta, scratch)
    x = torch.empty_like(s)
    dropped = _dropped(p, pos, neg, low, high, out=scratch, scratch=x)
    scratch = p  # p is not needed any more
    # The exponent of each term: s on negatives, -s on positives.
    x = torch.sub(neg, pos, out=x).mul_(s)
    # Each group's log(1 + sum e^x) is shifted by its largest kept exponent, at least 0 (the 1).
    # p grows with s, so a group that keeps any term keeps its largest exponent (the maximum
    # over the group, taken on x since p may tie at 0 where s does not), and it keeps some term
    # iff its extreme p is kept. A group that keeps nothing is shifted by 0, so an all-dropped
    # row gives 0 + log(1) = 0 exactly.
    top_neg = torch.add(x, pos, alpha=-_FAR, out=scratch).amax(1, keepdim=True)
    top_pos = torch.add(x, neg, alpha=-_FAR, out=scratch).amax(1, keepdim=True)
    # (Written as "not dropped" so that a NaN row keeps its maxima and its NaN or inf surfaces.)
    shift_neg = torch.where(max_neg < low, 0.0, top_neg).clamp_(min=0.0)
    shift_pos = torch.where(min_pos > high, 0.0, top_pos).clamp_(min=0.0)
    x.addcmul_(neg, shift_neg, value=-1.0).addcmul_(pos, shift_pos, value=-1.0)
    # Kept exponents are <= 0 after the shift and each sum holds a term of at least 1, so those
    # below -80 add less than 1e-34 each (under float64 rounding): clamping them keeps exp off
    # its slow path for subnormal results. The upper clamp keeps dropped terms from overflowing
    # before the mask zeroes them.
    kept = dropped.neg_().add_(1.0)
    e = x.clamp_(min=_EXP_FLOOR, max=0.0).exp_().mul_(kept)
    denom_neg = torch.exp(-shift_neg) + torch.mul(e, neg, out=scratch).sum(1, keepdim=True)
    denom_pos = torch.exp(-shift_pos) + torch.mul(e, pos, out=scratch).sum(1, keepdim=True)
    loss = torch.add(
        (shift_neg + denom_neg.log()).squeeze(1), (shift_pos + denom_pos.log()).squeeze(1)
    )
    # A masked sample keeps no term at all: decided by the keep rule, never by the loss value
    # (log(1 + e^-30) rounds to 0 in float32 on a row that keeps its terms).
    masked = (max_neg < low).logical_and_(min_pos > high).squeeze(1)
    if not need_grad:
        return loss, logits.new_empty(0), masked
    # d/ds_i = e_i / denom_neg on kept negatives, -e_j / denom_pos on kept positives (a masked row
    # keeps nothing: its gradient is exactly 0).
    nonzero = (~masked).unsqueeze(1)
    inv_neg = torch.where(nonzero, denom_neg.reciprocal(), 0.0)
    inv_pos = torch.where(nonzero, denom_pos.reciprocal(), 0.0)
    factor = torch.mul(neg, inv_neg, out=scratch).addcmul_(pos, inv_pos, value=-1.0)
    return loss, grad_layout(e.mul_(factor).to(logits.dtype), logits), masked


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
    return loss, empty_grad(logits, need_grad), logits.new_empty(rows, dtype=torch.bool)


register_row_autograd(multilabel_as_softmax_rows, "multilabel_as_softmax_loss")
