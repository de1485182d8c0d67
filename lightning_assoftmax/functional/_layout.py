"""The one place that maps ``F.cross_entropy`` layouts to rows and back (pure PyTorch)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["class_rows", "from_class_rows", "target_rows"]


def class_rows(t: Tensor) -> Tensor:
    """``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` (class dimension second) as ``(M, C)`` rows."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def target_rows(target: Tensor) -> Tensor:
    """The class-index target matching :func:`class_rows`, flat ``(M,)``."""
    return target.reshape(-1)


def from_class_rows(rows: Tensor, like_shape: torch.Size) -> Tensor:
    """Inverse of :func:`class_rows`: ``(M, C)`` rows back to ``like_shape`` (class second)."""
    if len(like_shape) <= 2:
        return rows.reshape(like_shape)
    moved = (like_shape[0],) + tuple(like_shape[2:]) + (like_shape[1],)
    return rows.reshape(moved).movedim(-1, 1)
