r"""Output layer and AS-Softmax loss fused, row chunk by row chunk.

For hidden states :math:`x` ``(M, d)``, class weights :math:`W` ``(V, d)`` and bias :math:`b`, the
logits :math:`z = x W^\top + b` of a large vocabulary are the biggest tensor of a training step
(8192 tokens x 128256 classes in bfloat16 is 2 GiB, and its gradient as much again). Here they
exist one chunk of rows at a time: each chunk's logits go through the single-label rows kernel
(:func:`~lightning_assoftmax.ops.single_label.as_softmax_forward_rows`, or the Triton kernel on
CUDA: loss, masked flags and :math:`\partial \ell / \partial z`, already multiplied by the
reduction's factor), and the chunk's gradient is folded straight into the gradients of :math:`x`,
:math:`W` and :math:`b`.

* ``mean`` and ``sum``: the gradients are formed in the forward pass, already scaled by the
  reduction (as Liger-Kernel's fused linear cross entropy does); backward multiplies them by the
  upstream gradient, in place unless autograd keeps the graph. Three matrix products per chunk,
  as many as the unfused layer.
* ``none``: the upstream gradient differs per row and is only known in backward, so backward
  recomputes each chunk's logits (as cut-cross-entropy does): four matrix products per chunk.

Masked rows (loss exactly 0) have an exactly zero gradient row, so they add nothing to the
products; ignored rows likewise.

Mixed precision follows torch's own fused ops and Liger-Kernel: under ``torch.autocast`` the
floating inputs other than float64 are cast to the autocast dtype (as ``F.linear`` does, so a
bfloat16 hidden state meets a float32 weight), the matrix products run in that dtype, the softmax,
keep decision, loss and reductions in float32, and autograd returns each gradient in its input's
own dtype. The chunks themselves run with autocast off, on the cast tensors.

Double backward is refused: the gradients are formed from the loss's own formula, not from
differentiable operations, so a second derivative through them would be silently wrong.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_assoftmax.ops._autograd import graph_is_kept
from lightning_assoftmax.ops.single_label import forward_rows_implementation

__all__ = ["autocast_linear_inputs", "default_chunk_rows", "linear_as_softmax_rows_loss"]

#: Bytes of one chunk's logits (in float32) that the default chunking aims for, per device type.
_CHUNK_BYTES = {"cpu": 32 * 2**20}
_DEFAULT_CHUNK_BYTES = 256 * 2**20


def default_chunk_rows(rows: int, num_classes: int, device: torch.device) -> int:
    """Rows per chunk so that a chunk's float32 logits take about the device's chunk budget."""
    budget = _CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES)
    return max(1, min(rows, budget // (4 * max(num_classes, 1))))


def autocast_linear_inputs(
    x: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``x``, ``weight`` and ``bias`` as ``F.linear`` sees them under the autocast of ``x``'s
    device: floating tensors other than float64 cast (differentiably) to the autocast dtype, as
    autocast casts them; unchanged where autocast is off."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor | None) -> Tensor | None:
        if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    delta: float,
    ignore_index: int,
    chunk_rows: int,
    row_scale: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """Loss ``(M,)`` and masked flags ``(M,)`` of every row, and the gradients in ``needs``
    (of ``x``, ``weight``, ``bias``) with each row's gradient multiplied by ``row_scale`` (a
    0-dim tensor or one value per row); no gradients when ``row_scale`` is ``None``.

    Autocast is off inside: the inputs already carry the dtype the products run in
    (:func:`autocast_linear_inputs`), and the gradient buffers must keep theirs."""
    with torch.autocast(x.device.type, enabled=False):
        rows = x.shape[0]
        need_grad = row_scale is not None and any(needs)
        loss = torch.empty(rows, dtype=_loss_dtype(x.dtype), device=x.device)
        masked = torch.empty(rows, dtype=torch.bool, device=x.device)
        grad_x = torch.empty_like(x) if need_grad and needs[0] else None
        grad_w = torch.zeros_like(weight) if need_grad and needs[1] else None
        grad_b = None
        if need_grad and needs[2] and bias is not None:
            grad_b = torch.zeros(bias.shape, dtype=loss.dtype, device=bias.device)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            x_chunk = x[start:stop]
            # One product with the bias, rounded once, as F.linear.
            logits = x_chunk @ weight.t() if bias is None else torch.addmm(bias, x_chunk, weight.t())
            scale = None
            if need_grad:
                scale = row_scale if row_scale.dim() == 0 else row_scale[start:stop]
            chunk_loss, grad, chunk_masked = forward_rows_implementation(logits)(
                logits, target[start:stop], delta, ignore_index, need_grad, grad_scale=scale
            )
            del logits
            loss[start:stop] = chunk_loss
            masked[start:stop] = chunk_masked
            if not need_grad:
                continue
            if grad_x is not None:
                torch.mm(grad, weight, out=grad_x[start:stop])
            if grad_w is not None:
                grad_w.addmm_(grad.t(), x_chunk)
            if grad_b is not None:
                grad_b += grad.sum(0, dtype=grad_b.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return loss, masked, [grad_x, grad_w, grad_b]


class _LinearASSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, delta, ignore_index, reduction, chunk_rows):
        needs = tuple(ctx.needs_input_grad[:3])
        valid_count = (target != ignore_index).sum()
        ctx.reduction, ctx.delta, ctx.ignore_index = reduction, delta, ignore_index
        ctx.chunk_rows, ctx.has_bias = chunk_rows, bias is not None
        if reduction == "none":
            loss, masked, _ = _chunks(x, weight, bias, target, delta, ignore_index, chunk_rows, None, needs)
            ctx.save_for_backward(x, weight, bias, target)
            ctx.mark_non_differentiable(masked, valid_count)
            return loss, masked, valid_count
        # The mean is over rows not ignored (0 when none is), as in F.cross_entropy.
        count = valid_count.clamp(min=1).to(_loss_dtype(x.dtype))
        scale = 1.0 / count if reduction == "mean" else torch.ones_like(count)
        loss, masked, grads = _chunks(x, weight, bias, target, delta, ignore_index, chunk_rows, scale, needs)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(masked, valid_count)
        return (loss.sum() / count if reduction == "mean" else loss.sum()), masked, valid_count

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        if torch.is_grad_enabled():
            # The gradients come from the loss's formula, not from differentiable operations:
            # a graph through them would give a wrong (zero) second derivative.
            raise RuntimeError(
                "linear_as_softmax_cross_entropy does not support double backward "
                "(create_graph=True): its gradients are formed from the loss's closed form. "
                "Differentiate the loss once, or use a plain-PyTorch formulation for "
                "higher-order derivatives (a gradient penalty)."
            )
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.reduction == "none":
            x, weight, bias, target = ctx.saved_tensors
            _, _, grads = _chunks(
                x, weight, bias, target, ctx.delta, ctx.ignore_index, ctx.chunk_rows,
                grad_out.to(_loss_dtype(x.dtype)), needs,
            )
        else:
            in_place = not graph_is_kept()
            grads = []
            for g in ctx.saved_tensors:
                if g is not None:
                    factor = grad_out.to(g.dtype)
                    g = g.mul_(factor) if in_place else g * factor
                grads.append(g)
        grad_x, grad_w, grad_b = grads
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None, None, None, None


def linear_as_softmax_rows_loss(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    delta: float,
    ignore_index: int,
    reduction: str,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss (reduced, or ``(M,)`` for ``"none"``), masked flags ``(M,)`` and the number of
    rows not ignored, for validated ``x`` ``(M, d)``, ``weight`` ``(V, d)``, ``bias`` ``(V,)`` or
    ``None`` and ``target`` ``(M,)``; never more than ``chunk_rows`` rows of logits at once."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(x.shape[0], weight.shape[0], x.device)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearASSoftmax.apply(x, weight, bias, target, delta, ignore_index, reduction, chunk_rows)
    needs = (False, False, False)
    loss, masked, _ = _chunks(x, weight, bias, target, delta, ignore_index, chunk_rows, None, needs)
    valid_count = (target != ignore_index).sum()
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / valid_count.clamp(min=1).to(loss.dtype)
    return loss, masked, valid_count
