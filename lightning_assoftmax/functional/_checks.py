"""Argument validation shared by the functional losses (one message per mistake, raised early)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_assoftmax.ops import (
    LabelsNotBinary,
    TargetOutOfRange,
    check_binary_labels,
    check_class_indices,
)

REDUCTIONS = ("mean", "sum", "none")


def check_delta(delta: float) -> float:
    """Return ``delta`` as a float in ``[0, 1]`` or raise a ``ValueError`` that says how to fix it."""
    if isinstance(delta, Tensor):
        if delta.numel() != 1:
            raise ValueError(f"delta must be a single number in [0, 1], got a tensor of shape {tuple(delta.shape)}.")
        delta = float(delta.item())
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a number in [0, 1], got {delta!r} of type {type(delta).__name__}.")
    delta = float(delta)
    if math.isnan(delta) or not 0.0 <= delta <= 1.0:
        raise ValueError(
            f"delta must lie in [0, 1], got {delta!r}. delta=1 keeps every class (plain softmax "
            "cross entropy); the paper's setting is delta=0.1."
        )
    return delta


def check_ignore_index(ignore_index: int) -> int:
    """Return ``ignore_index`` if it is an int, else raise a ``TypeError`` that says what to pass."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"ignore_index must be an int, the target value whose positions are skipped, got "
            f"{ignore_index!r} of type {type(ignore_index).__name__}; the default is -100, as in "
            "F.cross_entropy."
        )
    return ignore_index


def check_flag(name: str, value: bool, hint: str = "") -> bool:
    """Return ``value`` if it is a bool, else raise a ``TypeError`` naming ``name`` and the value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}.{hint}")
    return value


def check_real(
    value: float,
    what: str,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
    hint: str = "",
) -> float:
    """Return ``value`` as a float inside the stated interval or raise with the interval named."""
    interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{what} must be a number in {interval}, got {value!r} of type {type(value).__name__}."
            f"{' ' + hint if hint else ''}"
        )
    value = float(value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if math.isnan(value) or not (above and below):
        raise ValueError(f"{what} must lie in {interval}, got {value!r}.{' ' + hint if hint else ''}")
    return value


def check_positive_int(value: int, what: str, hint: str = "") -> int:
    """Return ``value`` if it is an integer >= 1, else raise naming ``what``, the value and the fix."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what} must be a positive integer, got {value!r} of type {type(value).__name__}."
            f"{' ' + hint if hint else ''}"
        )
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.{' ' + hint if hint else ''}")
    return value


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    return reduction


def check_logits(logits: Tensor, fn: str) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise TypeError(
            f"{fn}: logits must be a floating-point tensor, got dtype {logits.dtype}. "
            "Pass the model's raw scores (e.g. `logits.float()`)."
        )
    if logits.dim() == 0:
        raise ValueError(f"{fn}: logits must have a class dimension, got a 0-dim tensor.")


def check_class_target(
    logits: Tensor, target: Tensor, ignore_index: int, fn: str, values: bool = True
) -> None:
    """Validate a single-label target against ``logits`` laid out as in ``F.cross_entropy``;
    with ``values``, also that every class index is in range (reads the target on the host; the
    loss ops check it themselves, on CPU only, and are called with ``values=False``)."""
    check_logits(logits, fn)
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor of class indices, got {type(target).__name__}.")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{fn}: target must hold integer class indices (torch.long), got dtype {target.dtype}. "
            "Convert with `target.long()`; for multi-hot or probability targets use "
            "multilabel_as_softmax_loss / MultiLabelASSoftmaxLoss."
        )
    if logits.dim() == 1:
        expected: tuple[int, ...] = ()
    else:
        expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{fn}: target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}; expected target shape {expected} (logits are (N, C) or "
            "(N, C, d1, ...) with the class dimension second, as for F.cross_entropy; token "
            "logits shaped (N, L, C) need `logits.transpose(1, 2)`)."
        )
    num_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    if num_classes == 0:
        raise ValueError(f"{fn}: logits have 0 classes (shape {tuple(logits.shape)}).")
    if not values or target.numel() == 0:
        return
    try:
        check_class_indices(target, num_classes, ignore_index)
    except TargetOutOfRange as error:
        raise ValueError(f"{fn}: {error}") from None


def check_multilabel_target(logits: Tensor, target: Tensor, fn: str, values: bool = True) -> None:
    """Shape and type of a multi-label target and, with ``values``, that it holds only 0 and 1
    (reads the target on the host; the loss ops check it themselves, on CPU only, and are called
    with ``values=False``)."""
    check_logits(logits, fn)
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor of 0/1 labels, got {type(target).__name__}.")
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"{fn}: multi-label target shape {tuple(target.shape)} must equal the logits shape "
            f"{tuple(logits.shape)} (one 0/1 entry per label; convert class indices with "
            "F.one_hot(target, num_classes).)"
        )
    if values:
        try:
            check_binary_labels(target)
        except LabelsNotBinary as error:
            raise ValueError(f"{fn}: {error}") from None
