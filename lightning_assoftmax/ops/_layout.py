"""Where the row ops keep their ``(M, C)`` buffers in memory, shared by the implementations and
their fake (meta) versions so that both promise the same strides."""

from __future__ import annotations

from torch import Tensor

__all__ = ["CPU_VECTOR_CLASSES", "class_major", "empty_grad", "grad_layout"]

#: Float32 lanes of an AVX-512 vector. torch's CPU softmax and per-row reductions over fewer
#: classes than that run a scalar loop per row; over the rows of the transposed logits they are
#: vectorised (4x faster at 5 classes).
CPU_VECTOR_CLASSES = 16


def class_major(logits: Tensor) -> bool:
    """Whether the ops keep ``(M, C)`` buffers class by class in memory (``.t()`` of a
    contiguous ``(C, M)`` tensor): on CPU, for fewer than :data:`CPU_VECTOR_CLASSES` classes."""
    return logits.device.type == "cpu" and logits.shape[1] < CPU_VECTOR_CLASSES


def grad_layout(grad: Tensor, logits: Tensor) -> Tensor:
    """``grad`` ``(M, C)`` in the layout the ops return (no copy where it already is)."""
    if class_major(logits):
        return grad.t().contiguous().t()
    return grad.contiguous()


def empty_grad(logits: Tensor, need_grad: bool) -> Tensor:
    """An uninitialised gradient with the shape, dtype and strides the ops return."""
    if not need_grad:
        return logits.new_empty(0)
    if class_major(logits):
        return logits.new_empty((logits.shape[1], logits.shape[0])).t()
    return logits.new_empty(logits.shape)
