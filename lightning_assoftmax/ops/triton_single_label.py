r"""Triton kernel of the single-label AS-Softmax loss (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

One program per row walks the row in blocks three times and writes the gradient once:

1. online maximum :math:`m` and sum :math:`s = \sum_i e^{z_i - m}`, so :math:`p_i = e^{z_i - m} / s`;
2. the keep decision :math:`p_i \ge p_t - \delta` (the target always kept), the kept mass
   :math:`K = \sum_{\mathrm{kept}} p_i` and the number of kept classes;
3. the gradient :math:`[i\ \mathrm{kept}]\, p_i / K - [i = t]`, in the logits' dtype.

The loss is :math:`\log K - \log p_t` with :math:`\log p_t = z_t - m - \log s` (exact even when
:math:`p_t` underflows; :math:`K \ge \max_i p_i \ge 1/C` never does). A row that keeps only its
target is *masked*: its loss and gradient are written as exact zeros. NaN and ``+inf`` logits
propagate to a NaN loss (never masked), as the torch implementation does. Ignored rows get a zero
loss and gradient without reading their logits. Class indices are asserted on the device by the
caller (``torch._assert_async``, no host synchronisation), as ``F.cross_entropy`` does on CUDA.

Decisions, sums and the loss run in float32 whatever the logits' dtype (float16, bfloat16,
float32). This module holds the kernel and its launcher only; validation, layouts, reductions and
autograd live in :mod:`lightning_assoftmax.ops.single_label`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["SUPPORTED_DTYPES", "as_softmax_forward_rows_triton"]

#: Logits dtypes the kernel takes (float64 stays on the torch implementation).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest block of classes one program loads at once.
_MAX_BLOCK = 8192


@triton.jit
def _as_softmax_rows_kernel(
    z_ptr,
    z_row_stride,
    z_col_stride,
    target_ptr,
    target_stride,
    loss_ptr,
    masked_ptr,
    grad_ptr,
    grad_row_stride,
    scale_ptr,
    scale_stride,
    num_classes,
    delta,
    ignore_index,
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row * target_stride).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(masked_ptr + row, 0)
        if HAS_GRAD:
            for start in range(0, num_classes, BLOCK):
                offs = start + cols
                zero = tl.zeros([BLOCK], dtype=tl.float32)
                tl.store(grad_row + offs, zero.to(grad_ptr.dtype.element_ty), mask=offs < num_classes)
        return

    # The caller asserts class indices on the device (as F.cross_entropy does); should one slip
    # through, the row reads nothing out of bounds and its loss is NaN.
    in_range = (target >= 0) & (target < num_classes)

    # Pass 1: online max and sum of exponentials.
    m = -float("inf")
    s = 0.0
    for start in range(0, num_classes, BLOCK):
        offs = start + cols
        z = tl.load(z_row + offs * z_col_stride, mask=offs < num_classes, other=-float("inf"))
        z = z.to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A row of -inf so far keeps m at -inf: shift by 0 instead (exp(-inf) = 0, no NaN).
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
    shift = tl.where(m == -float("inf"), 0.0, m)

    z_t = tl.load(z_row + target * z_col_stride, mask=in_range, other=float("nan")).to(tl.float32)
    p_t = tl.exp(z_t - shift) / s
    threshold = p_t - delta

    # Pass 2: kept mass and number of kept classes.
    kept_mass = 0.0
    kept_count = 0
    for start in range(0, num_classes, BLOCK):
        offs = start + cols
        in_row = offs < num_classes
        z = tl.load(z_row + offs * z_col_stride, mask=in_row, other=-float("inf")).to(tl.float32)
        p = tl.exp(z - shift) / s
        # not (p < threshold): a NaN row keeps everything, so the NaN reaches the loss.
        keep = ((p >= threshold) | (p != p) | (offs == target)) & in_row
        kept_mass += tl.sum(tl.where(keep, p, 0.0), axis=0)
        kept_count += tl.sum(keep.to(tl.int32), axis=0)

    log_p_t = z_t - shift - tl.log(s)
    loss = tl.log(kept_mass) - log_p_t
    masked = (kept_count == 1) & (loss == loss)
    loss = tl.where(masked, 0.0, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(masked_ptr + row, masked.to(tl.int8))

    if HAS_GRAD:
        # Pass 3: the gradient, written once. Masked rows get exact zeros.
        inv_mass = tl.where(masked, 0.0, 1.0 / kept_mass)
        one_hot = 1.0
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            inv_mass = inv_mass * row_scale
            one_hot = row_scale
        for start in range(0, num_classes, BLOCK):
            offs = start + cols
            in_row = offs < num_classes
            z = tl.load(z_row + offs * z_col_stride, mask=in_row, other=-float("inf"))
            p = tl.exp(z.to(tl.float32) - shift) / s
            keep = (p >= threshold) | (p != p) | (offs == target)
            g = tl.where(keep, p * inv_mass, 0.0) - tl.where(offs == target, one_hot, 0.0)
            g = tl.where(masked, 0.0, g)
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def _launch_config(num_classes: int, dtype: torch.dtype) -> tuple[int, int]:
    """Block of classes and warps per program for ``num_classes`` columns."""
    block = min(triton.next_power_of_2(max(num_classes, 16)), _MAX_BLOCK)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def as_softmax_forward_rows_triton(
    logits: Tensor,
    target: Tensor,
    delta: float,
    ignore_index: int,
    need_grad: bool,
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row AS-Softmax loss, gradient and masked flags from one kernel launch.

    Args:
        logits: ``(M, C)`` float16/bfloat16/float32 scores, any strides (a transposed or
            expanded view is read in place).
        target: ``(M,)`` integer class indices of any integer dtype and any stride (a column
            ``labels[:, 0]``, an expanded stride-0 target); ``ignore_index`` marks skipped rows.
        delta: margin in ``[0, 1]``.
        ignore_index: target value of skipped rows.
        need_grad: whether to write the gradient.
        grad_scale: a 0-dim or ``(M,)`` float tensor (any stride) multiplying each row's
            gradient as it is written (the reduction's and the upstream gradient's factor, at no
            extra pass).

    Every tensor argument is read through its own strides; the outputs are new contiguous
    tensors.

    Returns:
        ``(loss (M,) float32, grad (M, C) in the logits' dtype with grad[r] = d loss[r] / d
        logits[r] (an empty tensor without need_grad), masked (M,) bool)``.
    """
    rows, num_classes = logits.shape
    if target.shape != (rows,) or target.device != logits.device:
        raise ValueError(
            f"as_softmax_forward_rows_triton: target must be ({rows},) on {logits.device} for logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)} on {target.device}."
        )
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    masked = torch.empty(rows, dtype=torch.int8, device=logits.device)
    if need_grad:
        grad = torch.empty((rows, num_classes), dtype=logits.dtype, device=logits.device)
    else:
        grad = torch.empty(0, dtype=logits.dtype, device=logits.device)
    if rows == 0:
        return loss, grad.reshape(0, num_classes) if need_grad else grad, masked.bool()
    if logits.is_cuda:
        # As F.cross_entropy on CUDA: a device-side assert, no host synchronisation.
        in_range = (target == ignore_index) | ((target >= 0) & (target < num_classes))
        torch._assert_async(in_range.all(), "target class index out of range")
    block, num_warps = _launch_config(num_classes, logits.dtype)
    _as_softmax_rows_kernel[(rows,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        target,
        target.stride(0),
        loss,
        masked,
        grad if need_grad else loss,
        grad.stride(0) if need_grad else 0,
        grad_scale if grad_scale is not None else loss,
        0 if grad_scale is None or grad_scale.dim() == 0 else grad_scale.stride(0),
        num_classes,
        float(delta),
        int(ignore_index),
        HAS_GRAD=need_grad,
        HAS_SCALE=grad_scale is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return loss, grad, masked.view(torch.bool)
