r"""Single-label AS-Softmax: keep mask, loss and masked-sample ratio.

For logits :math:`z`, target :math:`t` and :math:`p = \mathrm{softmax}(z)`, class :math:`i` is
*kept* iff :math:`p_t - p_i \le \delta` (the target always is), and

.. math:: \ell(z, t) = \log \sum_{i\ \mathrm{kept}} e^{z_i} - z_t
          = \log \sum_{i\ \mathrm{kept}} p_i - \log p_t .

When only the target is kept the loss is exactly 0 (and so is its gradient): a *masked sample*.
That is decided by the keep rule, never by the loss value: at ``delta = 1`` no sample is masked,
even one whose float32 loss rounds to 0.
The loss runs through the custom op of :mod:`lightning_assoftmax.ops` (one softmax per row gives
the decision, the loss and the gradient); this module validates, reshapes and reduces, without
reading any tensor value on the host, so a call never synchronises a GPU and compiles with
``torch.compile(fullgraph=True)``.

Everything here is pure PyTorch: no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_assoftmax.functional._checks import (
    check_class_target,
    check_delta,
    check_reduction,
)
from lightning_assoftmax.functional._layout import class_rows, from_class_rows, target_rows
from lightning_assoftmax.ops import (
    TargetOutOfRange,
    as_softmax_keep_threshold,
    as_softmax_rows,
    compute_dtype,
)

__all__ = [
    "as_softmax_cross_entropy",
    "as_softmax_keep_mask",
    "as_softmax_loss_and_flags",
    "as_softmax_loss_and_stats",
    "masked_sample_ratio",
]

_INT64 = range(-(2**63), 2**63)


def _loss(
    logits: Tensor, target: Tensor, delta: float, ignore_index: int, reduction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The reduced loss (``none``: shaped like ``target``), and the masked and valid flags of
    the elements, flat ``(M,)``."""
    fn = "as_softmax_cross_entropy"
    delta = check_delta(delta)
    reduction = check_reduction(reduction)
    # Class indices are range-checked by the op, on CPU only: reading them from a GPU would
    # synchronise (there, as with F.cross_entropy, a bad index is a device-side assert).
    check_class_target(logits, target, ignore_index, fn, values=False)
    z, t = class_rows(logits), target_rows(target)
    if ignore_index not in _INT64:  # no int64 target equals it; the op takes an int64
        ignore_index = -(2**63)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    try:
        rows, _, masked, _ = as_softmax_rows(z, t, delta, ignore_index, need_grad)
    except TargetOutOfRange as error:
        raise ValueError(f"{fn}: {error}") from None
    valid = t != ignore_index
    if reduction == "none":
        # A copy, not a view of the op's output: callers may weight the loss in place.
        out = rows if target.dim() == 1 else rows.reshape(target.shape).clone()
    elif reduction == "sum":
        out = rows.sum()
    else:  # over non-ignored elements; all ignored -> 0, not NaN
        out = rows.sum() / valid.sum().clamp(min=1)
    return out, masked, valid


def as_softmax_loss_and_flags(
    logits: Tensor,
    target: Tensor,
    delta: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss plus each element's masked flag and the number of non-ignored elements.

    Returns:
        ``(loss, masked, valid_count)``: ``masked`` is bool, shaped like ``target``, true where
        the keep rule keeps only the target (a *masked sample*: loss and gradient exactly 0;
        never at an ignored position, on a NaN row or at ``delta = 1``); ``valid_count`` is a
        0-dim ``torch.long`` tensor. Both detached.
    """
    out, masked, valid = _loss(logits, target, delta, ignore_index, reduction)
    return out, masked.reshape(target.shape), valid.sum()


def as_softmax_loss_and_stats(
    logits: Tensor,
    target: Tensor,
    delta: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss plus ``(masked_count, valid_count)`` from one pass (for metrics and callbacks).

    ``masked_count`` counts the non-ignored elements that keep only their target (masked
    samples, whose loss is exactly 0; a NaN row never is one, and at ``delta = 1`` none is, even
    where the float32 loss rounds to 0); ``valid_count`` counts non-ignored elements. Both are
    0-dim ``torch.long`` tensors, detached.
    """
    out, masked, valid = _loss(logits, target, delta, ignore_index, reduction)
    return out, masked.sum(), valid.sum()


def as_softmax_cross_entropy(
    logits: Tensor,
    target: Tensor,
    delta: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    r"""Adaptive Sparse Softmax cross entropy (Lv et al., TASLP 2025), a drop-in for ``F.cross_entropy``.

    Class :math:`i` takes part in the softmax only if :math:`p_t - p_i \le \delta`, where
    :math:`p = \mathrm{softmax}(z)` is computed (without gradient) from the full logits. The loss is
    :math:`\log\sum_{i\ \mathrm{kept}} e^{z_i} - z_t`: exactly ``F.cross_entropy`` for
    ``delta=1``, and exactly 0 (with zero gradient) for a sample whose target beats every other
    class by more than ``delta`` in probability.

    Args:
        logits: ``(N, C)``, ``(N, C, d1, ...)`` (class dimension second) or ``(C,)``; any float dtype.
            Half-precision logits are decided and reduced in float32.
        target: integer class indices, ``(N,)``, ``(N, d1, ...)`` or ``()``.
        delta: margin in ``[0, 1]``; larger keeps more classes.
        ignore_index: target value whose positions contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored elements; 0 if there are none), ``"sum"`` or
            ``"none"`` (shaped like ``target``, 0 at ignored positions).

    Returns:
        The loss, in float32 for half-precision logits, else in the logits' dtype.

    Example:
        >>> import torch
        >>> from lightning_assoftmax.functional import as_softmax_cross_entropy
        >>> logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.8, 0.0]])
        >>> as_softmax_cross_entropy(logits, torch.tensor([0, 0]), delta=0.1, reduction="none")
        tensor([0.0000, 0.5981])
    """
    return _loss(logits, target, delta, ignore_index, reduction)[0]


def as_softmax_keep_mask(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, ignore_index: int = -100
) -> Tensor:
    """Boolean mask of the classes AS-Softmax keeps, shaped like ``logits``.

    ``True`` where ``p_t - p_i <= delta`` (the target always). Ignored positions are all ``False``;
    rows with NaN or +inf logits are all ``True`` (nothing is hidden). No gradient flows through it.
    """
    delta = check_delta(delta)
    check_class_target(logits, target, ignore_index, "as_softmax_keep_mask")
    z, t = class_rows(logits), target_rows(target)
    with torch.no_grad():
        valid = t != ignore_index
        safe_target = torch.where(valid, t, torch.zeros_like(t))
        p = torch.softmax(z, dim=1, dtype=compute_dtype(z.dtype))
        threshold = as_softmax_keep_threshold(p.gather(1, safe_target.unsqueeze(1)), delta)
        # ~(p < threshold) rather than p >= threshold: rows with NaN keep everything.
        keep = ~(p < threshold) & valid.unsqueeze(1)
    return from_class_rows(keep, logits.shape)


def masked_sample_ratio(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, ignore_index: int = -100
) -> Tensor:
    """Share of non-ignored samples that keep only their target (masked samples, whose loss is
    exactly zero), as a 0-dim float tensor.

    Ignored positions are excluded from both counts; with no non-ignored sample the ratio is 0.
    A row with a NaN or +inf logit counts in the denominator and never as masked.
    """
    with torch.no_grad():
        _, masked, valid = as_softmax_loss_and_stats(
            logits, target, delta, ignore_index=ignore_index, reduction="sum"
        )
    return masked.float() / valid.clamp(min=1).float()
