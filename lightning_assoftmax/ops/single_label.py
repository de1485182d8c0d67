r"""Fused single-label AS-Softmax: loss, gradient and stats from one cache-blocked pass.

For logits :math:`z` with target :math:`t` and :math:`p = \mathrm{softmax}(z)`, class :math:`i`
is kept iff :math:`p_i \ge p_t - \delta` (the SPEC's :math:`p_t - p_i \le \delta`; the target
always is). With the kept mass :math:`K = \sum_{i\ \mathrm{kept}} p_i`,

.. math:: \ell = \log K - \log p_t, \qquad
          \frac{\partial \ell}{\partial z_i} = [i\ \mathrm{kept}]\,\frac{p_i}{K} - [i = t].

One softmax per row thus gives the decision, the loss and the gradient. The forward pass walks
the logits in cache-sized blocks (:mod:`._blocks`), runs six vectorised ops on each and writes one
buffer ``P`` (kept probabilities, :math:`p_t - K` at the target) plus ``1/K`` per row. Backward
scales ``P`` by ``grad / K`` in place when autograd will not need it again, so a forward+backward
allocates one ``(rows, C)`` tensor where ``F.cross_entropy`` allocates three.

On CPU, float32/float64 logits go through the compiled C kernel (:mod:`._native`,
``native/singlelabel.h``), which computes the same quantities in one call; this torch code is
the path for other devices, half inputs and machines without a C compiler. A device kernel (e.g.
Triton for CUDA) would slot in at :func:`as_softmax_rows_loss` with the same contract.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lightning_assoftmax.ops._blocks import BlockLayout, graph_is_kept, scale_rows, scratch
from lightning_assoftmax.ops._native import (
    direct_rows,
    kernel_applies,
    kernel_view,
    native_library,
    new_gradient,
    pointer,
    run_rows,
    scale_by_rows,
    split_workers,
    to_input_layout,
)

__all__ = [
    "TargetOutOfRange",
    "as_softmax_keep_threshold",
    "as_softmax_rows_loss",
    "compute_dtype",
    "target_out_of_range",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decisions and reductions run in at least float32 (half inputs are accepted)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_softmax_keep_threshold(p_target: Tensor, delta: float) -> Tensor:
    """The kept-class cut-off on probabilities: class ``i`` is kept iff ``p_i >= p_t - delta``.

    The one source of the decision rule in torch, shared by the loss kernel and the keep mask;
    the compiled kernel (``native/singlelabel.h``) computes the same ``p_t - delta``.
    """
    return p_target - delta


@functools.cache
def underflow_limit(cdtype: torch.dtype) -> float:
    """Probabilities below ``tiny ** 0.8`` have lost digits to underflow: the losses recompute
    what depends on them from the logits (shared by every kernel, torch and C)."""
    return torch.finfo(cdtype).tiny ** 0.8


class TargetOutOfRange(ValueError):
    """A class index is neither ``ignore_index`` nor in ``[0, C)`` (found by an op that reads it)."""


def target_out_of_range(target: Tensor, num_classes: int, ignore_index: int) -> int | None:
    """A class index of ``target`` outside ``[0, num_classes)`` other than ``ignore_index`` (the
    lowest if one is negative, else the highest), or ``None`` if there is none."""
    # Ignored positions read as class 0 (always in range): one fused min/max, no boolean indexing.
    zero = torch.zeros((), dtype=target.dtype, device=target.device)
    in_use = torch.where(target != ignore_index, target, zero)
    low, high = (int(v) for v in torch.aminmax(in_use))
    if low < 0:
        return low
    return high if high >= num_classes else None


#: Logits dtypes the compiled single-label kernel takes.
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _native_forward(
    lib,
    z: Tensor,
    target: Tensor,
    layout: BlockLayout | None,
    delta: float,
    ignore_index: int,
    need_grad: bool,
    reduction: str | None,
):
    """The compiled CPU kernel (see :mod:`._native`) for float32/float64 logits, or ``None`` if
    it could not run.

    ``z`` is ``(M, C)`` rows when ``layout`` is ``None``, else the layout's logits. Returns
    ``(loss, valid, v, factor, total, count)``: ``v`` holds the kept probabilities and ``p_t - K``
    at the target, ``factor`` is ``1/K`` per row (0 where the loss is exactly 0 or ignored),
    ``total`` the ``reduction`` of the losses where the kernel formed it (else ``None``) and
    ``count`` the number of rows not ignored. Raises :class:`TargetOutOfRange` when the kernel
    read a class index outside ``[0, C)``.
    """
    num_classes = z.shape[1]
    flat_target = target.reshape(-1)
    if flat_target.dtype != torch.int64 or not flat_target.is_contiguous():
        flat_target = flat_target.to(torch.int64).contiguous()
    rows, length, strides = kernel_view(layout, z)
    loss = torch.empty(rows, dtype=z.dtype)  # not a view: callers may modify it in place
    valid = torch.empty(rows, dtype=torch.bool)
    v, factor, grad_strides = None, None, (0, 0, 0)
    if need_grad:
        v, grad_strides = new_gradient(layout, z, z.dtype)
        factor = torch.empty(rows, dtype=z.dtype)
    # The kernel forms the reduction when one thread does all rows.
    total = None
    if reduction is not None and split_workers(rows, num_classes) == 1:
        total = torch.empty((), dtype=z.dtype)
    kernel = lib.singlelabel_f64 if z.dtype == torch.float64 else lib.singlelabel_f32
    tiny = underflow_limit(z.dtype)
    head = (pointer(z), pointer(flat_target), ignore_index, pointer(loss), pointer(valid))
    head = (*head, pointer(v), pointer(factor), pointer(total), int(reduction == "mean"))
    head = (*head, num_classes, length, *strides, *grad_strides, delta, tiny)

    def call(r0: int, r1: int) -> int:
        return kernel(*head, r0, r1)

    count = run_rows(call, rows, num_classes)
    if count == -2:
        raise TargetOutOfRange("target holds a class index outside [0, C)")
    if count < 0:  # no scratch memory
        return None
    return loss, valid, v, factor, total, count


def _forward(
    logits: Tensor,
    target: Tensor,
    delta: float,
    ignore_index: int,
    need_grad: bool,
    reduction: str | None = None,
    check_targets: bool = False,
):
    """Per-sample loss and validity and, if asked, the gradient buffer and ``1/K`` per sample,
    from the compiled kernel where it applies, else from torch ops: ``(loss, valid, out,
    inv_mass, layout, native, total, mean_over)``. ``layout`` is ``None`` for ``(M, C)`` logits
    on the compiled kernel (read as they are); ``total`` is the ``reduction`` of the losses (or
    ``None``) and, for the mean, ``mean_over`` its divisor: the number of rows not ignored, at
    least 1 (an int, or a tensor on the torch path). With ``check_targets``, a class index outside ``[0, C)`` raises
    :class:`TargetOutOfRange` (the kernel checks what it reads; the torch path checks here).
    """
    result = None
    layout = None
    if -(2**63) <= ignore_index < 2**63:  # the kernel takes it as int64
        direct = direct_rows(logits, _KERNEL_DTYPES)
        if direct is not None:
            lib, z = direct
            result = _native_forward(
                lib, z, target, None, delta, ignore_index, need_grad, reduction
            )
        if result is None:
            layout = BlockLayout(logits)
            if direct is None and kernel_applies(layout, _KERNEL_DTYPES):
                result = _native_forward(
                    native_library(), layout.z, target, layout, delta, ignore_index, need_grad,
                    reduction,
                )
    if result is not None:
        loss, valid, out, inv_mass, total, count = result
        native = True
    else:
        if check_targets:
            num_classes = logits.shape[1]
            if target_out_of_range(target, num_classes, ignore_index) is not None:
                raise TargetOutOfRange("target holds a class index outside [0, C)")
        layout = layout or BlockLayout(logits)
        loss, valid, out, inv_mass = _torch_forward(
            layout, logits, target, delta, ignore_index, need_grad
        )
        native, total, count = False, None, None
    mean_over = None
    if reduction == "mean":  # over non-ignored elements; all ignored -> 0, not NaN
        mean_over = valid.sum().clamp(min=1) if count is None else max(count, 1)
    if reduction is not None and total is None:
        total = loss.sum() if mean_over is None else loss.sum() / mean_over
    return loss, valid, out, inv_mass, layout, native, total, mean_over


def _torch_forward(
    layout: BlockLayout,
    logits: Tensor,
    target: Tensor,
    delta: float,
    ignore_index: int,
    need_grad: bool,
):
    """The torch implementation of :func:`_forward`, block by block."""
    cdtype = compute_dtype(logits.dtype)
    device = logits.device
    flat_valid = target.reshape(-1) != ignore_index  # returned: a base tensor, not a view
    target = target.reshape(layout.row_shape)
    valid = flat_valid.view(layout.row_shape)
    safe_target = torch.where(valid, target, 0)
    # Ignored samples get an infinite cut-off: the mask zeroes them without a separate pass.
    shift = torch.where(valid, delta, -math.inf)
    if shift.dtype != cdtype:
        shift = shift.to(cdtype)
    p_target = torch.empty(layout.row_shape, dtype=cdtype, device=device)
    kept_mass = torch.empty_like(p_target)

    out = layout.new_out(logits.dtype) if need_grad else None
    in_place = out is not None and logits.dtype == cdtype
    buffers: dict = {}
    split = layout.split
    outs = split(out) if out is not None else [None] * len(split(p_target))
    blocks = zip(
        split(layout.z),
        outs,
        split(p_target),
        split(kept_mass),
        split(safe_target),
        split(shift),
        strict=True,
    )
    for src, out_block, pt, mass_block, target_block, shift_block in blocks:
        direct = in_place and out_block.is_contiguous()
        probs = out_block if direct else scratch(buffers, "p", src.shape, src, cdtype)
        mask = scratch(buffers, "mask", src.shape, src, cdtype)
        threshold = scratch(buffers, "thr", pt.shape, pt, cdtype)
        torch.softmax(src, 1, dtype=cdtype, out=probs)
        torch.gather(probs, 1, target_block, out=pt)
        torch.sub(pt, shift_block, out=threshold)  # as_softmax_keep_threshold, in place
        # A float mask keeps the ops vectorised, and NaN * 0 = NaN keeps NaN rows visible.
        torch.ge(probs, threshold, out=mask)
        probs.mul_(mask)
        torch.sum(probs, 1, keepdim=True, out=mass_block)
        if out_block is not None and not direct:
            out_block.copy_(probs)

    pt_flat, mass = p_target.reshape(-1), kept_mass.reshape(-1)
    # loss = log K - log p_t, 0 at ignored samples (ratio 1; also keeps log off its slow path
    # for 0). A masked sample has K == p_t bit for bit: its loss is exactly 0.
    loss = torch.where(flat_valid, mass / pt_flat, 1.0).log_()
    tiny = underflow_limit(cdtype)
    # p_t lost digits to underflow: log p_t = z_t - logsumexp(z). A mask, not pt_flat.amin(): a NaN
    # row would make the minimum NaN and hide the other rows that need this.
    underflow = flat_valid & (pt_flat < tiny)
    if bool(underflow.any()):
        idx = underflow.nonzero().squeeze(1)
        z_t = layout.z.gather(1, safe_target).reshape(-1)[idx].to(cdtype)
        rows = layout.rows_of(layout.z, idx).to(cdtype)
        loss[idx] = mass[idx].log() - (z_t - torch.logsumexp(rows, dim=1))
    if out is None:
        return loss, flat_valid, None, None

    # Gradient at the target, p_t / K - 1, stored unscaled as p_t - K (exactly 0 when masked).
    target_entry = torch.where(valid, p_target - kept_mass, 0.0).to(out.dtype)
    if out.dtype in (torch.float16, torch.bfloat16):  # scatter_ is very slow for these on CPU
        out.view(-1).index_put_((layout.flat_positions(safe_target),), target_entry.reshape(-1))
    else:
        out.scatter_(1, safe_target, target_entry)
    if math.isnan(float(mass.sum())):  # an ignored sample holding NaN/inf still gets zero gradient
        ignored_nan = ~flat_valid & mass.isnan()
        if bool(ignored_nan.any()):
            layout.set_rows(out, ignored_nan.nonzero().squeeze(1), 0.0)
    # A sample with loss exactly 0 is masked: its gradient is exactly 0, not round-off. Ignored
    # samples have loss 0 too.
    inv_mass = torch.where(loss != 0, mass.reciprocal(), 0.0)
    return loss, flat_valid, out, inv_mass


class _FusedASSoftmax(torch.autograd.Function):
    """Per-sample loss with the gradient prepared in the forward pass; backward is one multiply.

    With ``reduction`` ``"mean"`` or ``"sum"`` the reduced loss is the output that carries the
    gradient, and the per-sample losses and validity come along detached: one autograd node.
    """

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        target: Tensor,
        delta: float,
        ignore_index: int,
        reduction: str | None,
        check: bool,
    ):
        loss, valid, out, inv_mass, layout, native, total, mean_over = _forward(
            logits, target, delta, ignore_index, True, reduction, check
        )
        ctx.native = native
        ctx.save_for_backward(out, inv_mass)
        ctx.layout = layout
        ctx.reduction = reduction
        ctx.mean_over = mean_over
        if reduction is None:
            ctx.mark_non_differentiable(valid)
            return loss, valid
        ctx.mark_non_differentiable(loss, valid)
        return total, loss, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, *_unused):
        out, inv_mass = ctx.saved_tensors
        layout = ctx.layout
        rows = inv_mass.shape[0]
        if ctx.mean_over is not None:  # the same share of the gradient for every row
            grad_loss = grad_loss / ctx.mean_over
        if ctx.native:
            if ctx.reduction is not None:
                grad_loss = float(grad_loss)
            # One C pass; in place unless autograd keeps the graph (see scale_rows).
            target = torch.empty_like(out) if graph_is_kept() else out
            factor = inv_mass.data_ptr()
            grad = scale_by_rows(out, factor, factor, grad_loss, target)
            return to_input_layout(layout, grad), None, None, None, None, None
        if ctx.reduction is not None:
            grad_loss = grad_loss.expand(rows)
        scale = (grad_loss.to(inv_mass.dtype) * inv_mass).reshape(layout.row_shape)
        grad = scale_rows(out, scale)
        return layout.to_input_layout(grad), None, None, None, None, None


def as_softmax_rows_loss(
    logits: Tensor,
    target: Tensor,
    delta: float,
    ignore_index: int,
    reduction: str | None = None,
    check_targets: bool = False,
) -> tuple[Tensor, ...]:
    """Per-sample AS-Softmax loss ``(M,)`` and validity ``(M,)`` for validated, non-empty inputs.

    Args:
        logits: ``(M, C)`` or ``(N, C, d1, ...)`` (class dimension second), any float dtype.
        target: class indices, ``(M,)`` or ``(N, d1, ...)``; ``ignore_index`` marks skipped ones.
        delta: margin in ``[0, 1]``.
        reduction: ``None`` returns ``(loss, valid)``; ``"mean"`` (over samples not ignored, 0 if
            there are none) or ``"sum"`` returns ``(reduced loss, loss, valid)``, the last two
            without gradient.
        check_targets: raise :class:`TargetOutOfRange` for a class index outside ``[0, C)``
            other than ``ignore_index`` (checked while the kernel reads it, where it does).

    The loss is float64 for float64 logits, else float32, and 0 at ignored samples; its gradient
    with respect to ``logits`` comes in the logits' dtype.
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return _FusedASSoftmax.apply(logits, target, delta, ignore_index, reduction, check_targets)
    with torch.no_grad():
        loss, valid, *_, total, _ = _forward(
            logits, target, delta, ignore_index, False, reduction, check_targets
        )
    return (loss, valid) if reduction is None else (total, loss, valid)
