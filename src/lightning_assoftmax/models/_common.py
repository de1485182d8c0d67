"""Argument checks and the optimizer shared by the ready-made models."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["adamw", "check_positive_int", "check_probability", "check_rate"]


def check_positive_int(owner: str, name: str, value: object, hint: str = "") -> int:
    """``value`` if it is an integer >= 1, else a ``ValueError`` naming ``owner.name`` and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}.{hint}")
    return value


def check_probability(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_rate(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices / kernels only (not on biases, norms, embeddings)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and "embed" not in name.lower() and "norm" not in name.lower()
        (decay if is_matrix else no_decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    params = decay + no_decay
    # The fused kernel is several times faster on CPU too (a large embedding table dominates the
    # step of the bag-of-embeddings model); it needs floating parameters on a CPU or CUDA device.
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
