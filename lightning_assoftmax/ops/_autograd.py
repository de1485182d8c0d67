"""The autograd side shared by the row-loss custom ops: the gradient is prepared in the forward.

Each op returns ``(loss (M,), grad (M, C), masked (M,))`` with ``grad`` the derivative of each
row's loss with respect to that row's logits, or ``(loss, grad, masked, row_scale (M,))`` where
that derivative is ``grad * row_scale`` per row (a normalisation left for the backward, which
then costs no pass of its own); backward multiplies by the upstream gradient of each row's loss. Nothing else is saved, so autograd keeps one ``(M, C)`` tensor, as
``F.cross_entropy`` keeps its log-probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["graph_is_kept", "register_row_autograd"]


def graph_is_kept() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``).

    When it does not, the saved gradient is dead after this backward and may be scaled in place
    (as compiled autograd does with donated buffers). Outside a backward pass, or on a torch
    without the query, the answer is True (never overwrite).
    """
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if getter is None else bool(getter())


def register_row_autograd(op: Any, loss_name: str) -> None:
    """Register the backward of a row-loss custom op ``op`` (see the module docstring)."""

    def setup_context(ctx, inputs, output) -> None:
        # (loss, grad, masked) or (loss, grad, masked, row_scale): see the module docstring.
        ctx.save_for_backward(*output[1:2], *output[3:])
        ctx.mark_non_differentiable(*output[1:])
        # No zero-filled (M, C) stand-in for the gradient of the unused outputs.
        ctx.set_materialize_grads(False)
        ctx.other_inputs = len(inputs) - 1

    def backward(ctx, grad_loss: Tensor, *_unused: Tensor):
        if torch.is_grad_enabled():
            # The saved gradient is a constant: a second derivative through it would be
            # silently wrong, not merely slow.
            raise RuntimeError(
                f"{loss_name} does not support double backward (create_graph=True): its "
                "gradient is computed in the forward pass. Differentiate the loss once, or use "
                "a plain-PyTorch formulation for higher-order derivatives."
            )
        grad, *row_scale = ctx.saved_tensors
        if grad_loss is None:  # the loss took no part in what is differentiated
            return (None,) * (1 + ctx.other_inputs)
        if grad.dim() != 2:
            raise RuntimeError(
                f"{loss_name}: backward through a call made with need_grad=False; pass "
                "need_grad=True when the logits require a gradient."
            )
        scale = (grad_loss * row_scale[0] if row_scale else grad_loss).unsqueeze(1)
        # Plain tensors only: under torch.compile the backward is traced functionally (fake and
        # functional tensor subclasses), and the compiler manages the buffers itself.
        if type(grad) is Tensor and not graph_is_kept():
            grad_logits = grad.mul_(scale)
        else:
            grad_logits = (grad * scale).to(grad.dtype)
        return (grad_logits,) + (None,) * ctx.other_inputs

    op.register_autograd(backward, setup_context=setup_context)
