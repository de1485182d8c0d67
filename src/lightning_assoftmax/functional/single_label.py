r"""Single-label AS-Softmax: keep mask, loss and masked-sample ratio.

For logits :math:`z`, target :math:`t` and :math:`p = \mathrm{softmax}(z)`, class :math:`i` is
*kept* iff :math:`p_t - p_i \le \delta` (the target always is), and

.. math:: \ell(z, t) = \log \sum_{i\ \mathrm{kept}} e^{z_i} - z_t .

With :math:`m = \max_i z_i` and :math:`e_i = e^{z_i - m}` the rule reads
:math:`e_i \ge e_t - \delta \sum_j e_j`, so one exponent pass serves the decision, the kept mass
and the gradient. The argmax class is always kept, hence :math:`\log\sum_{kept} e^{z_i} =
m + \log \sum_{kept} e_i`; when only the target is kept, it is the argmax, the sum is exactly 1 and
the loss is exactly 0 (and so is its gradient).

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

__all__ = [
    "as_softmax_cross_entropy",
    "as_softmax_keep_mask",
    "as_softmax_loss_and_stats",
    "masked_sample_ratio",
]


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # Decisions and reductions run in at least float32 (SPEC: half logits are accepted).
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _as_rows(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """View ``(N, C, d1, ...)`` / ``(C,)`` logits as ``(M, C)`` rows and the target as ``(M,)``."""
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.reshape(1)
    if logits.dim() == 2:
        return logits, target
    num_classes = logits.shape[1]
    return logits.movedim(1, -1).reshape(-1, num_classes), target.reshape(-1)


def _exp_and_keep(z: Tensor, safe_target: Tensor, delta: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """Shared core of the mask and the loss for ``(M, C)`` rows in the compute dtype.

    Returns ``(m, e, keep)`` with ``m`` the row max ``(M, 1)``, ``e = exp(z - m)`` and ``keep`` the
    boolean kept set, or ``None`` for "keep everything" (``delta = 1``). Rows with NaN (or +inf)
    logits keep everything so that the NaN reaches the loss instead of being hidden.
    """
    m = z.amax(dim=1, keepdim=True)  # amax propagates NaN
    e = torch.exp(z - m)
    if delta >= 1.0:
        return m, e, None
    e_t = e.gather(1, safe_target.unsqueeze(1))
    cutoff = e_t - delta * e.sum(dim=1, keepdim=True)
    # p_t - p_i <= delta  <=>  e_i >= e_t - delta * sum(e); written as ~(e < cutoff) so NaN keeps.
    keep = ~(e < cutoff)
    return m, e, keep


def _rows_forward(
    z: Tensor, target: Tensor, delta: float, ignore_index: int, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss ``(M,)`` (compute dtype), validity ``(M,)`` and, if asked, d loss_row / d z."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    zc = z.to(_compute_dtype(z))
    m, e, keep = _exp_and_keep(zc, safe_target, delta)
    e_kept = e if keep is None else e.masked_fill_(~keep, 0.0)
    kept_mass = e_kept.sum(dim=1, keepdim=True)
    z_t = zc.gather(1, safe_target.unsqueeze(1))
    loss = (torch.log(kept_mass) + (m - z_t)).squeeze(1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    grad = None
    if need_grad:
        # softmax over the kept set minus the one-hot target; masked classes get exactly 0.
        grad = e_kept.div_(kept_mass)
        grad.scatter_add_(1, safe_target.unsqueeze(1), torch.full_like(z_t, -1.0))
        grad.masked_fill_(~valid.unsqueeze(1), 0.0)
        grad = grad.to(z.dtype)
    return loss, valid, grad


class _ASSoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row AS-Softmax loss with the gradient formed in the forward pass.

    Backward is a single broadcast multiply of the saved ``(M, C)`` gradient, so the saved memory
    equals what ``F.cross_entropy`` keeps (its log-softmax output).
    """

    @staticmethod
    def forward(ctx, z: Tensor, target: Tensor, delta: float, ignore_index: int):
        loss, valid, grad = _rows_forward(z, target, delta, ignore_index, need_grad=True)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(valid)
        return loss, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_valid: Tensor | None):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype).unsqueeze(1), None, None, None


def _row_losses(logits: Tensor, target: Tensor, delta: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    z, t = _as_rows(logits, target)
    if z.shape[0] == 0:
        # Stay attached to the graph: backward through an empty batch must work (zero gradient).
        empty = z.to(_compute_dtype(z)).sum(dim=1)
        return empty, torch.zeros(0, dtype=torch.bool, device=z.device)
    if torch.is_grad_enabled() and z.requires_grad:
        return _ASSoftmaxCrossEntropy.apply(z, t, delta, ignore_index)
    loss, valid, _ = _rows_forward(z, t, delta, ignore_index, need_grad=False)
    return loss, valid


def _reduce(loss_rows: Tensor, valid: Tensor, reduction: str, target_shape: torch.Size) -> Tensor:
    if reduction == "none":
        return loss_rows.reshape(target_shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    # mean over non-ignored elements, zero-loss rows included; all ignored -> 0, not NaN.
    return total / valid.sum().clamp(min=1).to(total.dtype)


def as_softmax_loss_and_stats(
    logits: Tensor,
    target: Tensor,
    delta: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss plus ``(masked_count, valid_count)`` from one pass (for metrics and callbacks).

    ``masked_count`` counts non-ignored elements whose loss is exactly zero (a NaN loss never is);
    ``valid_count`` counts non-ignored elements. Both are 0-dim ``torch.long`` tensors, detached.
    """
    fn = "as_softmax_cross_entropy"
    delta = check_delta(delta)
    reduction = check_reduction(reduction)
    check_class_target(logits, target, ignore_index, fn)
    loss_rows, valid = _row_losses(logits, target, delta, ignore_index)
    with torch.no_grad():
        masked = (valid & (loss_rows.detach() == 0)).sum()
        valid_count = valid.sum()
    return _reduce(loss_rows, valid, reduction, target.shape), masked, valid_count


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
    loss, _, _ = as_softmax_loss_and_stats(
        logits, target, delta, ignore_index=ignore_index, reduction=reduction
    )
    return loss


def as_softmax_keep_mask(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, ignore_index: int = -100
) -> Tensor:
    """Boolean mask of the classes AS-Softmax keeps, shaped like ``logits``.

    ``True`` where ``p_t - p_i <= delta`` (the target always). Ignored positions are all ``False``;
    rows with NaN or +inf logits are all ``True`` (nothing is hidden). No gradient flows through it.
    """
    delta = check_delta(delta)
    check_class_target(logits, target, ignore_index, "as_softmax_keep_mask")
    z, t = _as_rows(logits, target)
    with torch.no_grad():
        valid = t != ignore_index
        safe_target = torch.where(valid, t, torch.zeros_like(t))
        _, _, keep = _exp_and_keep(z.to(_compute_dtype(z)), safe_target, delta)
        if keep is None:
            keep = torch.ones(z.shape, dtype=torch.bool, device=z.device)
        keep &= valid.unsqueeze(1)
    if logits.dim() == 1:
        return keep.reshape(logits.shape)
    if logits.dim() == 2:
        return keep
    moved = logits.movedim(1, -1).shape
    return keep.reshape(moved).movedim(-1, 1)


def masked_sample_ratio(
    logits: Tensor, target: Tensor, delta: float = 0.1, *, ignore_index: int = -100
) -> Tensor:
    """Share of non-ignored samples whose AS-Softmax loss is exactly zero, as a 0-dim float tensor.

    Ignored positions are excluded from both counts; with no non-ignored sample the ratio is 0.
    A row with a NaN or +inf logit counts in the denominator and never as masked.
    """
    with torch.no_grad():
        _, masked, valid = as_softmax_loss_and_stats(
            logits, target, delta, ignore_index=ignore_index, reduction="sum"
        )
    return masked.float() / valid.clamp(min=1).float()
