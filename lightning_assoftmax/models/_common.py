"""The optimizer shared by the ready-made models."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["adamw"]


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
