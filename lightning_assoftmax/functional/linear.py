r"""AS-Softmax fused with the output layer, for large vocabularies (pure PyTorch, no Lightning).

``linear_as_softmax_cross_entropy(x, W, t, b)`` equals
``as_softmax_cross_entropy(F.linear(x, W, b), t)`` in value and gradient, but never holds the
``(N, V)`` logits of the whole batch: it works in chunks of rows (see
:mod:`lightning_assoftmax.ops.linear_single_label`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_assoftmax.functional._checks import (
    check_delta,
    check_ignore_index,
    check_positive_int,
    check_reduction,
)
from lightning_assoftmax.ops import check_class_indices
from lightning_assoftmax.ops.linear_single_label import (
    autocast_linear_inputs,
    linear_as_softmax_rows_loss,
)

__all__ = [
    "linear_as_softmax_cross_entropy",
    "linear_as_softmax_loss_and_flags",
    "linear_as_softmax_loss_and_stats",
]


def _check_linear_inputs(
    input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int, fn: str
) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{fn}: weight must be (num_classes, in_features) as nn.Linear.weight, got shape "
            f"{tuple(weight.shape)}."
        )
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: input shape {tuple(input.shape)} must end with in_features={weight.shape[1]} "
            f"(the second dimension of weight {tuple(weight.shape)})."
        )
    if input.dtype != weight.dtype:
        # Called after autocast's casts (autocast_linear_inputs): a mismatch left here is one
        # that autocast does not resolve, or autocast is off.
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type):
            why = "torch.autocast leaves float64 tensors uncast"
        else:
            why = f"torch.autocast is not enabled for {device_type} here, so nothing casts them"
        raise TypeError(
            f"{fn}: input ({input.dtype}) and weight ({weight.dtype}) must have the same dtype, as "
            f"for F.linear ({why}); cast one of them, e.g. `input.to({weight.dtype})`."
        )
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},), got {shape}.")
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must be an integer tensor of class indices (torch.long).")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{fn}: target shape {tuple(target.shape)} must equal input shape without its last "
            f"dimension, {tuple(input.shape[:-1])}."
        )
    if target.device.type == "cpu":
        check_class_indices(target, weight.shape[0], ignore_index)


def linear_as_softmax_loss_and_stats(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    delta: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`linear_as_softmax_cross_entropy` plus ``(masked_count, valid_count)`` (0-dim long
    tensors, detached), as :func:`~lightning_assoftmax.functional.as_softmax_loss_and_stats`."""
    loss, masked, valid_count = linear_as_softmax_loss_and_flags(
        input, weight, target, bias, delta,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )
    return loss, masked.sum(), valid_count


def linear_as_softmax_loss_and_flags(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    delta: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`linear_as_softmax_cross_entropy` plus each position's masked flag (bool, shaped
    like ``target``) and the number of non-ignored positions, as
    :func:`~lightning_assoftmax.functional.single_label.as_softmax_loss_and_flags`."""
    fn = "linear_as_softmax_cross_entropy"
    delta = check_delta(delta)
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size", "It is the number of rows of logits formed at once.")
    for name, value in (("input", input), ("weight", weight)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point torch.Tensor, got {value!r:.80}.")
    if isinstance(bias, Tensor):
        input, weight, bias = autocast_linear_inputs(input, weight, bias)
    else:  # a wrong bias is reported by the checks below
        input, weight, _ = autocast_linear_inputs(input, weight, None)
    _check_linear_inputs(input, weight, target, bias, ignore_index, fn)
    x = input.reshape(-1, input.shape[-1])
    flat_target = target.reshape(-1)
    loss, masked, valid_count = linear_as_softmax_rows_loss(
        x, weight, bias, flat_target, delta, ignore_index, reduction, chunk_size
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss, masked.reshape(target.shape), valid_count


def linear_as_softmax_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    delta: float = 0.1,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""AS-Softmax cross entropy of ``F.linear(input, weight, bias)`` without forming its logits.

    Equal in value and gradient to
    ``as_softmax_cross_entropy(F.linear(input, weight, bias), target, delta)`` (with the logits'
    class dimension last), but the ``(N, V)`` logits exist only ``chunk_size`` rows at a time, so
    the memory of the output layer no longer grows with ``N * V``. Use it for large vocabularies
    (language-model heads, 30k-250k classes).

    Args:
        input: hidden states ``(N, d)`` or ``(N, L, d)`` (any leading dimensions), float16,
            bfloat16, float32 or float64.
        weight: class weights ``(V, d)`` (``nn.Linear.weight``), the dtype of ``input``.
        target: class indices shaped like ``input`` without its last dimension.
        bias: ``(V,)`` or ``None``.
        delta: AS-Softmax margin in ``[0, 1]`` (``1``: plain cross entropy).
        ignore_index: target value whose positions contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored positions), ``"sum"`` or ``"none"``.
        chunk_size: rows of logits formed at once; by default about 32 MiB of float32 logits on
            CPU and 256 MiB on accelerators.

    With ``mean`` or ``sum`` the gradients are computed during the forward pass (three matrix
    products per chunk, as many as the unfused layer); with ``none`` backward recomputes the
    logits (four). Double backward is not supported.

    Example:
        >>> import torch
        >>> from lightning_assoftmax.functional import linear_as_softmax_cross_entropy
        >>> x, w = torch.eye(3), 5 * torch.eye(3)
        >>> linear_as_softmax_cross_entropy(x, w, torch.tensor([0, 1, 1]), reduction="none")
        tensor([0.0000, 0.0000, 5.0134])
    """
    return linear_as_softmax_loss_and_stats(
        input, weight, target, bias, delta,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )[0]
