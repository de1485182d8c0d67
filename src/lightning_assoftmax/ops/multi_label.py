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

from lightning_assoftmax.ops._blocks import (
    FEW_CLASSES,
    BlockLayout,
    graph_is_kept,
    scale_rows,
    scratch,
)
from lightning_assoftmax.ops._native import (
    kernel_applies,
    kernel_view,
    native_for,
    native_library,
    new_gradient,
    pointer,
    rows_major,
    rows_view,
    run_rows,
    scale_by_rows,
    to_input_layout,
)
from lightning_assoftmax.ops.single_label import compute_dtype, underflow_limit

__all__ = ["multilabel_as_softmax_keep", "multilabel_as_softmax_rows_loss"]


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


def _native_forward(
    lib, z: Tensor, target: Tensor, layout: BlockLayout | None, delta: float, need_grad: bool
):
    """The compiled CPU kernel (see :mod:`._native`), or ``None`` if it could not run.

    ``z`` and ``target`` are ``(M, C)`` rows when ``layout`` is ``None``, else tensors in that
    block layout. Returns ``(loss, v, factors, redo)``: with a gradient, ``v`` holds ``p`` on kept
    negatives, ``-1/p`` on kept positives and 0 elsewhere, and ``factors`` (``(2, rows)``:
    neg_scale and pos_scale per row) turn it into the gradient (:func:`_apply_factors`).
    ``redo`` is ``None`` when no row needs the exact path.
    """
    cdtype = compute_dtype(z.dtype)
    if z.dtype != cdtype:
        z = z.to(cdtype)
    # Labels are read as they are when stored as bytes or in the compute dtype.
    y_real = target.dtype == cdtype
    if not y_real:
        if target.dtype not in (torch.bool, torch.uint8):
            target = target != 0
        target = target.view(torch.uint8)
    num_classes = z.shape[1]
    if layout is None:
        rows = z.shape[0]
        length, z_strides = rows_view(z)
        y_strides = rows_view(target)[1]
    else:
        rows = layout.num_rows
        length, z_strides = kernel_view(layout, z)
        y_strides = kernel_view(layout, target)[1]
    loss = torch.empty(rows, dtype=cdtype)  # not a view: callers may modify it in place
    redo = torch.empty(rows, dtype=torch.uint8)
    v, factors = None, None
    grad_strides = (0, 0, 0)
    if need_grad:
        if layout is None:
            v = torch.empty(rows, num_classes, dtype=cdtype)
            grad_strides = (0, 1, num_classes)
        else:
            v, grad_strides = new_gradient(layout, cdtype)
        factors = torch.empty(2, rows, dtype=cdtype)  # neg_scale and pos_scale rows
    kernel = lib.multilabel_f64 if cdtype == torch.float64 else lib.multilabel_f32
    tiny, big = _precision_limits(cdtype)
    outputs = (pointer(loss), pointer(v), *_factor_pointers(factors), pointer(redo))
    head = (pointer(z), pointer(target), int(y_real), *outputs, num_classes, length)
    # The kernel tests |lse| > big as e^lse against e^big.
    head = (*head, *z_strides, *y_strides, *grad_strides, delta, tiny, math.exp(big))

    def call(r0: int, r1: int) -> int:
        return kernel(*head, r0, r1)

    flagged = run_rows(call, rows, num_classes)
    if flagged < 0:  # the kernel could not allocate its scratch memory
        return None
    return loss, v, factors, redo.bool() if flagged else None


def _factor_pointers(factors: Tensor | None) -> tuple[int | None, int | None]:
    """Addresses of the two rows of a contiguous ``(2, rows)`` factor buffer (no view objects)."""
    if factors is None:
        return None, None
    start = factors.data_ptr()
    return start, start + factors.shape[1] * factors.element_size()


def _apply_factors(v: Tensor, factors: Tensor, grad_loss: Tensor, out: Tensor) -> Tensor:
    """``out = grad_loss * v * (pos if v < 0 else neg)`` per row, ``(neg, pos) = factors``."""
    return scale_by_rows(v, *_factor_pointers(factors), grad_loss, out)


@functools.cache
def _precision_limits(cdtype: torch.dtype) -> tuple[float, float]:
    """Below ``tiny`` a positive's ``1/p`` loses digits; above ``big`` ``e^{+-lse}`` may overflow."""
    return underflow_limit(cdtype), 0.68 * math.log(torch.finfo(cdtype).max)


def _forward(logits: Tensor, target: Tensor, delta: float, need_grad: bool):
    """Per-row loss ``(M,)``, the gradient buffer and its per-row factors, and the block layout
    (``None`` for ``(M, C)`` logits on the compiled kernels, which read them as they are).

    The factors are ``None`` when the buffer already holds the gradient (torch path, half inputs).
    """
    result = None
    layout = None
    lib = native_for(logits, _KERNEL_DTYPES) if logits.dim() == 2 else None
    if lib is not None:
        # Few classes are read in tiles with any strides; long rows are walked in place.
        z = logits if logits.shape[1] < FEW_CLASSES else logits.contiguous()
        result = _native_forward(lib, z, target, None, delta, need_grad)
    if result is None:
        layout = BlockLayout(logits)
        target = layout.to_layout(target)
        if lib is None and kernel_applies(layout, _KERNEL_DTYPES):
            result = _native_forward(native_library(), layout.z, target, layout, delta, need_grad)
    if result is None:
        loss, out, redo = _torch_forward(layout, logits.dtype, target, delta, need_grad)
        factors = None
    else:
        loss, out, factors, redo = result
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
                factors[:, idx] = 1.0
    if factors is not None and out.dtype != logits.dtype:
        # Half inputs: a half buffer cannot hold -1/p, so the gradient is formed here.
        ones = torch.ones((), dtype=out.dtype).expand(loss.shape[0])
        out = _apply_factors(out, factors, ones, out=out).to(logits.dtype)
        factors = None
    return loss, out, factors, layout


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
    """Per-row multi-label loss with the gradient prepared in the forward pass."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, delta: float):
        loss, out, factors, layout = _forward(logits, target, delta, True)
        # A row with loss exactly 0 is a masked sample: its gradient is exactly 0, not round-off.
        # The factors path zeroes it in the C pass (v = 0 there); otherwise a mask is saved (not
        # the loss itself, so callers may modify the loss in place).
        ctx.save_for_backward(out, loss != 0 if factors is None else factors)
        ctx.layout = layout
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        out, extra = ctx.saved_tensors
        layout = ctx.layout
        if extra.dim() == 2:  # the factors
            # In place unless autograd keeps the graph (see scale_rows).
            target = torch.empty_like(out) if graph_is_kept() else out
            grad = _apply_factors(out, extra, grad_loss, out=target)
        else:  # the rows with a non-zero loss
            shape = (-1, 1) if rows_major(layout, out) else layout.row_shape
            grad = scale_rows(out, torch.where(extra, grad_loss, 0.0).reshape(shape))
        return to_input_layout(layout, grad), None, None


def multilabel_as_softmax_rows_loss(logits: Tensor, target: Tensor, delta: float) -> Tensor:
    """Per-row multi-label AS-Softmax loss ``(M,)`` for validated, non-empty inputs.

    Args:
        logits: ``(M, C)`` or ``(N, C, d1, ...)`` (labels second), any float dtype.
        target: 0/1 labels of the same shape (float, integer or bool).
        delta: margin in ``[0, 1]``.

    Rows are ordered as ``logits.movedim(1, -1).reshape(-1, C)``. The loss is float64 for
    float64 logits, else float32; the gradient comes in the logits' dtype.
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return _FusedMultiLabelASSoftmax.apply(logits, target, delta)
    with torch.no_grad():
        loss = _forward(logits, target, delta, False)[0]
    return loss
