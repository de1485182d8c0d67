r"""Single-label AS-Softmax rows: loss, gradient and masked flag from one softmax, as a custom op.

For logits :math:`z` with target :math:`t` and :math:`p = \mathrm{softmax}(z)`, class :math:`i`
is kept iff :math:`p_i \ge p_t - \delta` (the SPEC's :math:`p_t - p_i \le \delta`; the target
always is). With the kept mass :math:`K = \sum_{i\ \mathrm{kept}} p_i`,

.. math:: \ell = \log K - \log p_t, \qquad
          \frac{\partial \ell}{\partial z_i} = [i\ \mathrm{kept}]\,\frac{p_i}{K} - [i = t].

One softmax per row thus gives the decision, the loss and the gradient. A row whose only kept
class is the target is a *masked sample* (the paper's definition, decided by the keep rule, never
by the loss value): its loss and gradient are exactly 0. At ``delta = 1`` every class is kept and
no row is masked, even one whose float32 loss rounds to 0.

:func:`as_softmax_forward_rows` is the one implementation of this math (plain torch, any
device). The custom op ``lightning_assoftmax::as_softmax_rows`` wraps it with a fake
implementation and a registered backward, so eager mode and ``torch.compile(fullgraph=True)`` run
the same code; on CUDA it runs the Triton kernel of :mod:`.triton_single_label` where that module
imports. Nothing here synchronises a device with the host: every per-row choice is a
``torch.where``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_assoftmax.ops._autograd import register_row_autograd
from lightning_assoftmax.ops._layout import class_major, empty_grad, grad_layout

__all__ = [
    "TargetOutOfRange",
    "as_softmax_forward_rows",
    "as_softmax_keep_threshold",
    "as_softmax_rows",
    "check_class_indices",
    "compute_dtype",
    "target_out_of_range",
]

RowsResult = tuple[Tensor, Tensor, Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decisions and reductions run in at least float32 (half inputs are accepted)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_softmax_keep_threshold(p_target: Tensor, delta: float) -> Tensor:
    """The kept-class cut-off on probabilities: class ``i`` is kept iff ``p_i >= p_t - delta``.

    The one source of the decision rule, shared by the loss and the keep mask.
    """
    return p_target - delta


@functools.cache
def underflow_limit(cdtype: torch.dtype) -> float:
    """Below ``tiny ** 0.8`` a probability has lost digits to underflow; what depends on it is
    taken from the log-probabilities instead."""
    return torch.finfo(cdtype).tiny ** 0.8


class TargetOutOfRange(ValueError):
    """A class index is neither ``ignore_index`` nor in ``[0, C)``."""


def target_out_of_range(target: Tensor, num_classes: int, ignore_index: int) -> int | None:
    """A class index of ``target`` outside ``[0, num_classes)`` other than ``ignore_index`` (the
    lowest if one is negative, else the highest), or ``None`` if there is none.

    Reads the values on the host: call it for CPU tensors only (on a GPU it would synchronise).
    """
    if target.numel() == 0:
        return None
    low, high = (int(v) for v in torch.aminmax(target.reshape(-1)))
    if 0 <= low and high < num_classes:
        return None
    # Ignored positions read as class 0 (always in range): one fused min/max, no boolean indexing.
    in_use = torch.where(target != ignore_index, target, torch.zeros_like(target))
    low, high = (int(v) for v in torch.aminmax(in_use.reshape(-1)))
    if low < 0:
        return low
    return high if high >= num_classes else None


def check_class_indices(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise :class:`TargetOutOfRange` naming the first offending class index, if any."""
    bad = target_out_of_range(target, num_classes, ignore_index)
    if bad is not None:
        raise TargetOutOfRange(
            f"target contains class index {bad}, outside [0, {num_classes - 1}] for "
            f"{num_classes} classes (ignore_index={ignore_index} marks positions to skip). "
            "Check the label encoding or the size of the classifier head."
        )


def as_softmax_forward_rows(
    logits: Tensor,
    target: Tensor,
    delta: float,
    ignore_index: int,
    need_grad: bool,
    grad_scale: Tensor | None = None,
) -> RowsResult:
    """Per-row AS-Softmax loss, its gradient and the masked flag, in plain torch.

    Args:
        logits: ``(M, C)``, any float dtype, any device, any strides.
        target: ``(M,)`` integer class indices in ``[0, C)`` or ``ignore_index`` (not checked).
        delta: margin in ``[0, 1]``.
        ignore_index: target value whose rows get loss 0 and gradient 0.
        need_grad: also compute the gradient (else an empty tensor is returned in its place).
        grad_scale: a 0-dim or ``(M,)`` factor applied to each row's gradient as it is formed
            (the fused linear loss passes its reduction's and upstream gradient's factor).

    Returns:
        ``loss`` ``(M,)`` in float32 (float64 for float64 logits); ``grad`` ``(M, C)`` in the
        logits' dtype, the derivative of each row's loss with respect to its logits; ``masked``
        ``(M,)`` bool, the rows not ignored that keep only their target (their loss and gradient
        are exactly 0). A row with a NaN or +inf logit has a NaN loss and is never masked.
    """
    loss, grad, masked, _ = _forward_rows(logits, target, delta, ignore_index, need_grad, grad_scale, True)
    return loss, grad, masked


def _forward_rows(
    logits: Tensor,
    target: Tensor,
    delta: float,
    ignore_index: int,
    need_grad: bool,
    grad_scale: Tensor | None,
    normalise: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`as_softmax_forward_rows`, plus the gradient's row factor when ``normalise`` is
    false: the returned ``grad`` is then ``kept p - K onehot(t)`` and ``row_scale`` ``(M,)`` its
    factor ``1 / K`` (0 on masked and ignored rows), which the backward folds into its
    multiplication by the upstream gradient: one full pass fewer."""
    cdtype = compute_dtype(logits.dtype)
    on_cpu = logits.device.type == "cpu"
    valid_rows = target != ignore_index
    safe_target = torch.where(valid_rows, target, 0).unsqueeze(1).long()
    # Each full (M, C) pass below is a kernel launch (and, on CPU, a parallel region whose
    # threads must all arrive): few passes, all in place in the one buffer that becomes the
    # gradient, plus one 0/1 float mask (a float comparison output is vectorised on CPU; a
    # boolean mask, torch.where and masked_fill cost several times more there).
    if class_major(logits):
        # Class by class in memory (see class_major); the buffers below inherit the layout.
        p = torch.softmax(logits.t(), 0, dtype=cdtype).t()
    else:
        p = torch.softmax(logits, 1, dtype=cdtype)
    p_target = p.gather(1, safe_target)
    # NaN probabilities (a row with a NaN or +inf logit) compare False: kept by no class, so
    # such a row never counts as masked; its loss is NaN through p_t.
    threshold = as_softmax_keep_threshold(p_target, delta)
    keep = torch.ge(p, threshold, out=torch.empty_like(p))
    # The paper's masked sample: only the target kept (the authors count rows with C - 1
    # logits at -inf), never "the loss rounds to 0": at delta = 1 nothing is masked.
    exact_count = _needs_kept_count(delta, p.shape[1], cdtype)
    if exact_count:
        masked = (keep.sum(1) == 1).logical_and_(valid_rows)
    kept = p.mul_(keep)
    del keep
    kept_mass = kept.sum(1, keepdim=True)
    if not exact_count:
        # Only the target kept <=> K == p_t bit for bit, where every other kept class adds at
        # least the cut-off: above 2 eps no rounding absorbs it (see _needs_kept_count).
        tolerance = 2 * torch.finfo(cdtype).eps
        masked = (kept_mass == p_target).logical_and_(threshold > tolerance).squeeze(1)
        masked.logical_and_(valid_rows)
    if not on_cpu or bool(kept_mass.isnan().any()):
        # NaN * 0 stays NaN: clear it, so that ignored rows holding NaN get a zero gradient. On
        # CPU only the rare batch with a NaN pays this pass (a CPU tensor has no device to
        # synchronise with).
        kept.nan_to_num_(nan=0.0)
    # log(K / p_t) is exactly 0 when only the target is kept; where p_t underflowed, log p_t
    # comes from the logits (z_t - logsumexp z) instead. xlogy(1, x) is log(x) without the
    # parallel region that torch.log opens on CPU from 2048 elements on: one per loss call
    # costs a thread rendezvous, several milliseconds on a loaded machine.
    low = p_target < underflow_limit(cdtype)
    if not on_cpu or bool(low.any()):
        z_target = logits.gather(1, safe_target).to(cdtype)
        log_p_target = z_target - torch.logsumexp(logits.to(cdtype), 1, keepdim=True)
        row_loss = torch.where(low, kept_mass.log() - log_p_target, kept_mass.div(p_target).log_())
    else:
        row_loss = torch.xlogy(1.0, kept_mass.div(p_target))
    active = valid_rows.logical_and(masked.logical_not())
    loss = torch.where(active, row_loss.squeeze(1), 0.0)
    if not need_grad:
        return loss, logits.new_empty(0), masked, None
    # d loss / dz = (kept p - K onehot(t)) / K; masked and ignored rows get exactly 0 through
    # their factor 0 (their kept p is finite: p_t alone, or zeros).
    active = active.unsqueeze(1)
    inv_mass = torch.where(active, kept_mass.reciprocal(), 0.0)
    grad = kept.scatter_add_(1, safe_target, torch.where(active, kept_mass, 0.0).neg_())
    if not normalise:
        return loss, grad_layout(grad, logits), masked, inv_mass.squeeze(1)
    if grad_scale is not None:
        inv_mass = inv_mass * (grad_scale if grad_scale.dim() == 0 else grad_scale.unsqueeze(1)).to(cdtype)
    grad = grad.mul_(inv_mass)
    return loss, grad_layout(grad.to(logits.dtype), logits), masked, None


def _needs_kept_count(delta: float, num_classes: int, cdtype: torch.dtype) -> bool:
    """Whether "only the target kept" must be counted class by class rather than read off
    ``K == p_t`` (one reduction fewer).

    Every other kept class adds ``p_i >= p_t - delta`` to the kept mass ``K``. Where that
    cut-off exceeds ``2 eps`` the addition always shows, so ``K == p_t`` iff only the target is
    kept; a row that keeps only its target with a cut-off below ``2 eps`` leaves all other
    classes under ``2 eps`` each, so ``p_t > 1 - C * 2 eps``, which needs ``delta`` that close
    to 1 (and a single class is always alone). Decided on Python numbers: no tensor is read.
    """
    return num_classes == 1 or delta >= 1.0 - (num_classes + 1) * 2 * torch.finfo(cdtype).eps


@functools.cache
def _triton_single_label():
    """The Triton module for CUDA, or ``None`` where it does not import (no triton)."""
    try:
        from lightning_assoftmax.ops import triton_single_label
    except ImportError:
        return None
    return triton_single_label


#: Logits dtypes the Triton kernel takes.
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def forward_rows_implementation(logits: Tensor) -> Callable[..., RowsResult]:
    """The implementation of :func:`as_softmax_forward_rows` for these logits: the Triton kernel
    for CUDA float32/float16/bfloat16 logits where triton is installed, else the torch code."""
    if logits.is_cuda and logits.dtype in _TRITON_DTYPES:
        module = _triton_single_label()
        if module is not None:
            return module.as_softmax_forward_rows_triton
    return as_softmax_forward_rows


@torch.library.custom_op("lightning_assoftmax::as_softmax_rows", mutates_args=())
def as_softmax_rows(
    logits: Tensor, target: Tensor, delta: float, ignore_index: int, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`as_softmax_forward_rows` as a custom op (differentiable in ``logits``).

    Returns ``(loss, grad, masked, row_scale)``: the derivative of row ``r``'s loss is
    ``grad[r] * row_scale[r]`` (the backward multiplies both by the upstream gradient at once;
    ``row_scale`` is all ones where ``grad`` is the derivative itself, and empty without
    ``need_grad``).

    Class indices are checked on CPU (:class:`TargetOutOfRange`); on other devices an index
    outside ``[0, C)`` fails in the kernel, as with ``F.cross_entropy`` (a device-side assert on
    CUDA), since checking it there would synchronise with the host.
    """
    if target.device.type == "cpu":
        check_class_indices(target, logits.shape[1], ignore_index)
    implementation = forward_rows_implementation(logits)
    if need_grad and implementation is as_softmax_forward_rows and logits.dtype == compute_dtype(logits.dtype):
        loss, grad, masked, row_scale = _forward_rows(logits, target, delta, ignore_index, True, None, False)
        return loss, grad, masked, row_scale
    loss, grad, masked = implementation(logits, target, delta, ignore_index, need_grad)
    rows = logits.shape[0] if need_grad else 0
    return loss, grad, masked, torch.ones(rows, dtype=loss.dtype, device=loss.device)


@as_softmax_rows.register_fake
def _(logits: Tensor, target: Tensor, delta: float, ignore_index: int, need_grad: bool):
    cdtype = compute_dtype(logits.dtype)
    rows = logits.shape[0]
    loss = logits.new_empty(rows, dtype=cdtype)
    row_scale = logits.new_empty(rows if need_grad else 0, dtype=cdtype)
    return loss, empty_grad(logits, need_grad), logits.new_empty(rows, dtype=torch.bool), row_scale


register_row_autograd(as_softmax_rows, "as_softmax_cross_entropy")
