r"""Fused multi-label AS-Softmax: loss and gradient from one cache-blocked pass.

Per row with scores :math:`s`, positives :math:`P`, negatives :math:`Q`, :math:`p = \mathrm{softmax}(s)`
and :math:`\lambda = \log\sum_i e^{s_i}`: a negative is kept iff :math:`p_i \ge \min_P p - \delta`
and a positive iff :math:`p_j \le \max_Q p + \delta` (all negatives when :math:`P` is empty, all
positives when :math:`Q` is). Since :math:`e^{s_i} = p_i e^{\lambda}` and
:math:`e^{-s_j} = e^{-\lambda} / p_j`, the kept sums :math:`A = \sum_{Q\ \mathrm{kept}} p_i` and
:math:`B = \sum_{P\ \mathrm{kept}} 1/p_j` give

.. math:: \ell = \mathrm{softplus}(\lambda + \log A) + \mathrm{softplus}(\log B - \lambda),

with gradient :math:`p_i e^{\lambda - \ell_Q}` on kept negatives and
:math:`-e^{-\lambda - \ell_P} / p_j` on kept positives, so the softmax that decides also yields the
loss and the gradient, with no second exponential pass. Rows where that shortcut loses digits
(a positive with :math:`p_j` near underflow, or :math:`\lambda` so large that kept negatives
underflow) are recomputed exactly with per-group shifted exponentials.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lightning_assoftmax.ops._blocks import BlockLayout, graph_is_kept, scale_rows, scratch
from lightning_assoftmax.ops._native import (
    count_not_binary,
    direct_rows,
    kernel_applies,
    kernel_view,
    native_library,
    new_gradient,
    pointer,
    rows_major,
    run_rows,
    scale_by_rows,
    split_workers,
    to_input_layout,
)
from lightning_assoftmax.ops.single_label import compute_dtype, underflow_limit

__all__ = [
    "LabelsNotBinary",
    "labels_are_binary",
    "multilabel_as_softmax_keep",
    "multilabel_as_softmax_rows_loss",
]


def _cutoff_offsets(positives: Tensor, num_classes: int, delta: float) -> tuple[Tensor, Tensor]:
    """The multi-label decision rule, as offsets to two per-row reductions of ``p = softmax(s)``.

    With ``neg`` the 0/1 negative indicator, ``low = amin(p + neg) + low_offset`` and
    ``high = amax(p * neg) + high_offset``; a negative is kept iff ``p >= low`` and a positive iff
    ``p <= high``. For a row with positives the reductions are the min over positives and the max
    over negatives, and the offsets are ``-delta`` and ``+delta`` (SPEC: ``min_P p - p_i <= delta``,
    ``p_j - max_Q p <= delta``). A row without positives gets ``low <= 0`` (keep every negative),
    one without negatives ``high >= 1`` (keep every positive). NaN rows get NaN cut-offs, which
    callers treat as "keep". ``positives`` counts the positive labels of each row (float).
    """
    # Arithmetic on 0/1 indicators rather than selects: these run once per block.
    has_pos = positives.clamp(max=1.0)
    has_neg = positives.neg().add_(num_classes).clamp_(max=1.0)
    low_offset = has_pos.mul(2.0 - delta).sub_(2.0)  # -delta, or -2
    high_offset = has_neg.mul(delta - 1.0).add_(1.0)  # +delta, or 1
    return low_offset, high_offset


def multilabel_as_softmax_keep(scores: Tensor, positive: Tensor, delta: float) -> Tensor:
    """Kept terms ``(M, C)`` for float ``scores`` rows and boolean ``positive`` (no gradient)."""
    with torch.no_grad():
        p = torch.softmax(scores, dim=1)
        neg = (~positive).to(p.dtype)
        low_offset, high_offset = _cutoff_offsets(
            positive.sum(dim=1, keepdim=True).to(p.dtype), scores.shape[1], delta
        )
        low = (p + neg).amin(dim=1, keepdim=True) + low_offset
        high = (p * neg).amax(dim=1, keepdim=True) + high_offset
        # ~(p < low) rather than p >= low: NaN rows keep every term and the NaN surfaces.
        return torch.where(positive, ~(p > high), ~(p < low))


def _exact_rows(scores: Tensor, positive: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """Loss ``(R,)`` and gradient ``(R, C)`` of a few rows, each group with its own exp shift."""
    keep = multilabel_as_softmax_keep(scores, positive, delta)
    signed = torch.where(positive, -scores, scores)
    loss = scores.new_zeros(scores.shape[0])
    grad = torch.zeros_like(scores)
    for group in (~positive, positive):
        terms = signed.masked_fill(~(keep & group), float("-inf"))
        shift = terms.amax(dim=1, keepdim=True).clamp(min=0.0)
        # A +inf term (e.g. a -inf positive) makes the loss +inf: shift by 0 there, not inf - inf.
        shift = shift.masked_fill(shift == math.inf, 0.0)
        exps = torch.exp(terms - shift)
        denom = torch.exp(-shift) + exps.sum(dim=1, keepdim=True)
        loss += (shift + torch.log(denom)).squeeze(1)
        grad += exps / denom
    return loss, torch.where(positive, -grad, grad)


#: Logits dtypes the compiled kernels take (half ones are converted to float32 first).
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class LabelsNotBinary(ValueError):
    """A multi-label target holds a value other than 0 and 1 (found by a kernel that reads it)."""


def labels_are_binary(target: Tensor) -> bool:
    """Whether every entry of a multi-label target is 0 or 1, without a full-size boolean
    temporary per comparison."""
    if target.dtype == torch.bool:
        return True
    if not target.is_floating_point():
        low, high = torch.aminmax(target.reshape(-1))
        return bool(low >= 0) and bool(high <= 1)
    bad = count_not_binary(target)  # one pass in C where the compiled kernels run
    if bad is not None:
        return bad == 0
    # For floats, v * v == v exactly iff v is 0 or 1 (NaN never); pieces keep temporaries small.
    for piece in target.reshape(-1).split(1 << 20):
        if not torch.equal(piece * piece, piece):
            return False
    return True


def _native_forward(
    lib,
    z: Tensor,
    target: Tensor,
    layout: BlockLayout | None,
    delta: float,
    need_grad: bool,
    reduction: str | None,
):
    """The compiled CPU kernel (see :mod:`._native`), or ``None`` if it could not run.

    ``z`` and ``target`` are ``(M, C)`` rows when ``layout`` is ``None``, else tensors in that
    block layout. Returns ``(loss, v, factors, redo, total, labels_checked)``: with a gradient,
    ``v`` holds ``p`` on kept negatives, ``-1/p`` on kept positives and 0 elsewhere, and
    ``factors`` (neg_scale, then pos_scale per row, in one flat buffer) turn it into the gradient
    (:func:`_apply_factors`). ``redo`` is ``None`` when no row needs the exact path; ``total`` is
    the ``reduction`` of the losses when the kernel could form it, else ``None``. Raises
    :class:`LabelsNotBinary` when the kernel read a label other than 0 and 1.
    """
    cdtype = compute_dtype(z.dtype)
    if z.dtype != cdtype:
        z = z.to(cdtype)
    # Labels are read as they are (and checked) when stored as bytes or in the compute dtype.
    y_real = target.dtype == cdtype
    labels_checked = y_real or target.dtype in (torch.bool, torch.uint8)
    if not y_real:
        if target.dtype not in (torch.bool, torch.uint8):
            target = target != 0
        target = target.view(torch.uint8)
    num_classes = z.shape[1]
    rows, length, z_strides = kernel_view(layout, z)
    y_strides = kernel_view(layout, target)[2]
    loss = torch.empty(rows, dtype=cdtype)  # not a view: callers may modify it in place
    # One buffer for the per-row factors (if any) and then the redo flags (bytes).
    size = loss.element_size()
    factor_count = 2 * rows if need_grad else 0
    aux = torch.empty(factor_count + -(-rows // size), dtype=cdtype)
    start = aux.data_ptr()
    v, grad_strides = None, (0, 0, 0)
    if need_grad:
        v, grad_strides = new_gradient(layout, z, cdtype)
    # The kernel forms the reduction when one thread does all rows.
    total = None
    if reduction is not None and split_workers(rows, num_classes) == 1:
        total = torch.empty((), dtype=cdtype)
    kernel = lib.multilabel_f64 if cdtype == torch.float64 else lib.multilabel_f32
    tiny, big = _precision_limits(cdtype)
    factor_ptrs = _factor_pointers(aux, rows) if need_grad else (None, None)
    redo_ptr = start + factor_count * size
    outputs = (pointer(loss), pointer(v), *factor_ptrs, redo_ptr, pointer(total))
    head = (pointer(z), pointer(target), int(y_real), *outputs, num_classes, length)
    # The kernel tests |lse| > big as e^lse against e^big.
    head = (*head, *z_strides, *y_strides, *grad_strides, delta, tiny, math.exp(big))
    head = (*head, 1.0 / rows if reduction == "mean" else 1.0)

    def call(r0: int, r1: int) -> int:
        return kernel(*head, r0, r1)

    flagged = run_rows(call, rows, num_classes)
    if flagged == -2:
        raise LabelsNotBinary("multi-label target holds a value other than 0 and 1")
    if flagged < 0:  # the kernel could not allocate its scratch memory
        return None
    redo = None
    if flagged:
        redo = aux.view(torch.uint8)[factor_count * size :][:rows].bool()
        total = None  # the redone rows change it
    factors = aux if need_grad else None
    return loss, v, factors, redo, total, labels_checked


def _factor_pointers(factors: Tensor, rows: int) -> tuple[int, int]:
    """Addresses of neg_scale and pos_scale in a kernel's flat factor buffer (no view objects)."""
    start = factors.data_ptr()
    return start, start + rows * factors.element_size()


def _apply_factors(
    v: Tensor, factors: Tensor, rows: int, grad_loss: Tensor | float, out: Tensor
) -> Tensor:
    """``out = grad_loss * v * (pos if v < 0 else neg)`` per row, ``(neg, pos) = factors``;
    ``grad_loss`` per row, or one number for all."""
    return scale_by_rows(v, *_factor_pointers(factors, rows), grad_loss, out)


@functools.cache
def _precision_limits(cdtype: torch.dtype) -> tuple[float, float]:
    """Below ``tiny`` a positive's ``1/p`` loses digits; above ``big`` ``e^{+-lse}`` may overflow."""
    return underflow_limit(cdtype), 0.68 * math.log(torch.finfo(cdtype).max)


def _forward(
    logits: Tensor,
    target: Tensor,
    delta: float,
    need_grad: bool,
    reduction: str | None = None,
    check_labels: bool = False,
):
    """``(loss, out, factors, layout, total)``: per-row loss ``(M,)``, the gradient buffer and
    its per-row factors, the block layout (``None`` for ``(M, C)`` logits on the compiled
    kernels, which read them as they are) and, for a ``reduction``, the reduced loss.

    The factors are ``None`` when the buffer already holds the gradient (torch path, half inputs).
    With ``check_labels``, a target value other than 0 and 1 raises :class:`LabelsNotBinary`
    (the kernels check what they read; other paths check here).
    """
    result = None
    layout = None
    direct = direct_rows(logits, _KERNEL_DTYPES)
    if direct is not None:
        lib, z = direct
        result = _native_forward(lib, z, target, None, delta, need_grad, reduction)
    if result is None:
        layout = BlockLayout(logits)
        target = layout.to_layout(target)
        if direct is None and kernel_applies(layout, _KERNEL_DTYPES):
            lib = native_library()
            result = _native_forward(lib, layout.z, target, layout, delta, need_grad, reduction)
    if result is None:
        loss, out, redo = _torch_forward(layout, logits.dtype, target, delta, need_grad)
        factors, total, labels_checked = None, None, False
    else:
        loss, out, factors, redo, total, labels_checked = result
    if check_labels and not labels_checked and not labels_are_binary(target):
        raise LabelsNotBinary("multi-label target holds a value other than 0 and 1")
    # Where 1/p_j or e^{+-lse} would lose digits or overflow, recompute with shifted exponentials.
    if redo is not None and bool(redo.any()):
        idx = redo.nonzero().squeeze(1)
        if layout is None:
            rows, positive = logits[idx], target[idx] > 0.5
        else:
            rows, positive = layout.rows_of(layout.z, idx), layout.rows_of(target, idx) > 0.5
        row_loss, row_grad = _exact_rows(rows.to(loss.dtype), positive, delta)
        loss[idx] = row_loss
        if out is not None:
            if rows_major(layout, out):
                out[idx] = row_grad.to(out.dtype)
            else:
                layout.set_rows(out, idx, row_grad.to(out.dtype))
            if factors is not None:  # the exact rows are gradients already
                factors[idx] = 1.0
                factors[idx + loss.shape[0]] = 1.0
    if factors is not None and out.dtype != logits.dtype:
        # Half inputs: a half buffer cannot hold -1/p, so the gradient is formed here.
        out = _apply_factors(out, factors, loss.shape[0], 1.0, out=out).to(logits.dtype)
        factors = None
    if reduction is not None and total is None:
        total = loss.mean() if reduction == "mean" else loss.sum()
    return loss, out, factors, layout, total


def _torch_forward(
    layout: BlockLayout, dtype: torch.dtype, target: Tensor, delta: float, need_grad: bool
):
    """The same kernel from torch ops, block by block: ``(loss, grad, redo)``."""
    cdtype = compute_dtype(dtype)
    device = layout.z.device
    num_classes = layout.num_classes
    # Flat buffers viewed per row: the returned loss must not be a view (callers may modify it).
    flat_loss = torch.empty(layout.num_rows, dtype=cdtype, device=device)
    loss = flat_loss.view(layout.row_shape)
    min_pos = torch.empty_like(loss)
    log_sum = torch.empty_like(loss)
    out = layout.new_out(dtype) if need_grad else None
    direct = out is not None and dtype == cdtype and not layout.columns
    one = torch.ones((), dtype=cdtype, device=device)
    buffers: dict = {}
    split = layout.split
    outs = split(out) if out is not None else [None] * len(split(loss))
    blocks = zip(
        split(layout.z),
        split(target),
        outs,
        split(loss),
        split(min_pos),
        split(log_sum),
        strict=True,
    )
    for src, pos, out_block, loss_block, min_pos_block, lse_block in blocks:

        def buf(name: str, like: Tensor = src) -> Tensor:
            return scratch(buffers, name, like.shape, like, cdtype)

        if layout.transposed or src.dtype != cdtype:  # several ops read it: convert once
            src = buf("src").copy_(src)
        # The target block is overwritten with 1/p below, so it is always a copy.
        pos = buf("pos").copy_(pos)
        low_offset, high_offset = _cutoff_offsets(pos.sum(1, keepdim=True), num_classes, delta)
        neg = torch.sub(one, pos, out=buf("neg"))
        p = torch.softmax(src, 1, dtype=cdtype, out=buf("p"))
        # min over positives of p: negatives read as p + 1 >= 1. Also the denominator of 1/p.
        shifted = torch.add(p, neg, out=buf("shifted"))
        low = torch.amin(shifted, 1, keepdim=True, out=min_pos_block).add(low_offset)
        neg_p = neg.mul_(p)
        high = torch.amax(neg_p, 1, keepdim=True).add_(high_offset)
        # log sum exp(s) = max s - log max p, as max p = 1 / sum exp(s - max s).
        lse = torch.amax(src, 1, keepdim=True, out=lse_block)
        lse.sub_(torch.amax(p, 1, keepdim=True).log_())
        # Float masks keep the ops vectorised; NaN * 0 = NaN keeps NaN rows visible.
        mask = buf("mask")
        neg_p.mul_(torch.ge(p, low, out=mask))
        inv_pos = pos.div_(shifted)  # 1/p on positives, 0 on negatives
        inv_pos.mul_(torch.le(p, high, out=mask))
        neg_mass = neg_p.sum(1, keepdim=True)
        pos_mass = inv_pos.sum(1, keepdim=True)
        # log(1 + e^lse A) and log(1 + e^-lse B): exactly 0 for empty sums. Rows with a large
        # |lse| are recomputed below, so here neither exponential overflows.
        exp_lse = lse.exp()
        inv_exp_lse = exp_lse.reciprocal()
        row_loss = torch.log1p(neg_mass * exp_lse, out=loss_block)
        row_loss.add_((pos_mass * inv_exp_lse).log1p_())
        if out is None:
            continue
        # Gradient e^s / (1 + e^lse A) = p / (e^-lse + A) on kept negatives, and
        # -e^-s / (1 + e^-lse B) = -(1/p) / (e^lse + B) on kept positives.
        neg_scale = inv_exp_lse.add_(neg_mass).reciprocal_()
        pos_scale = exp_lse.add_(pos_mass).reciprocal_().neg_()
        grad = out_block if direct else shifted
        torch.mul(neg_p, neg_scale, out=grad)
        grad.addcmul_(inv_pos, pos_scale)
        if not direct:
            out_block.copy_(grad)

    min_pos, log_sum = min_pos.reshape(-1), log_sum.reshape(-1)
    tiny, big = _precision_limits(cdtype)
    # A mask, not amin/amax over the batch: a NaN row would make those NaN and hide the other
    # rows that need the exact path.
    redo = (min_pos < tiny) | (log_sum.abs() > big) | (flat_loss == math.inf)
    return flat_loss, out, redo


class _FusedMultiLabelASSoftmax(torch.autograd.Function):
    """Per-row multi-label loss with the gradient prepared in the forward pass.

    With ``reduction`` ``"mean"`` or ``"sum"`` the reduced loss is the output that carries the
    gradient, and the per-row losses come along detached: one autograd node, not two.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, target: Tensor, delta: float, reduction: str | None, check: bool
    ):
        loss, out, factors, layout, total = _forward(logits, target, delta, True, reduction, check)
        # A row with loss exactly 0 is a masked sample: its gradient is exactly 0, not round-off.
        # The factors path zeroes it in the C pass (v = 0 there); otherwise a mask is saved (not
        # the loss itself, so callers may modify the loss in place).
        ctx.save_for_backward(out, loss != 0 if factors is None else factors)
        ctx.layout = layout
        ctx.reduction = reduction
        ctx.rows = loss.shape[0]
        if reduction is None:
            return loss
        ctx.mark_non_differentiable(loss)
        return total, loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, *_unused):
        out, extra = ctx.saved_tensors
        layout = ctx.layout
        rows = ctx.rows
        if extra.dtype != torch.bool:  # the factors
            if ctx.reduction is not None:  # one number for every row
                grad_loss = grad_loss.item() / (rows if ctx.reduction == "mean" else 1)
            # In place unless autograd keeps the graph (see scale_rows).
            target = torch.empty_like(out) if graph_is_kept() else out
            grad = _apply_factors(out, extra, rows, grad_loss, out=target)
        else:  # the rows with a non-zero loss
            if ctx.reduction is not None:
                scale = grad_loss / rows if ctx.reduction == "mean" else grad_loss
                grad_loss = scale.expand(rows)
            shape = (-1, 1) if rows_major(layout, out) else layout.row_shape
            grad = scale_rows(out, torch.where(extra, grad_loss, 0.0).reshape(shape))
        return to_input_layout(layout, grad), None, None, None, None


def multilabel_as_softmax_rows_loss(
    logits: Tensor,
    target: Tensor,
    delta: float,
    reduction: str | None = None,
    check_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-row multi-label AS-Softmax loss ``(M,)`` for validated, non-empty inputs.

    Args:
        logits: ``(M, C)`` or ``(N, C, d1, ...)`` (labels second), any float dtype.
        target: 0/1 labels of the same shape (float, integer or bool).
        delta: margin in ``[0, 1]``.
        reduction: ``None`` returns the per-row losses; ``"mean"`` or ``"sum"`` returns
            ``(reduced loss, per-row losses)``, the latter without gradient.
        check_labels: raise :class:`LabelsNotBinary` if ``target`` holds a value other than
            0 and 1 (checked while the kernels read it, where they do).

    Rows are ordered as ``logits.movedim(1, -1).reshape(-1, C)``. The loss is float64 for
    float64 logits, else float32; the gradient comes in the logits' dtype.
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return _FusedMultiLabelASSoftmax.apply(logits, target, delta, reduction, check_labels)
    with torch.no_grad():
        loss, _, _, _, total = _forward(logits, target, delta, False, reduction, check_labels)
    return loss if reduction is None else (total, loss)
