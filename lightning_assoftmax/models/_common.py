"""What the ready-made models share: the optimizer and the choice of output layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from torch import nn

from lightning_assoftmax.heads import (
    HEADS,
    OutputHead,
    build_head,
    check_head_name,
    head_kwarg_names,
)

__all__ = ["adamw", "check_class_names", "keep_class_counts_if_used", "output_head"]


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


def output_head(
    owner: str,
    in_features: int,
    num_classes: int,
    head: str,
    head_kwargs: Mapping[str, Any] | None,
    class_counts: Sequence[float] | None,
    loss: str,
    loss_kwargs: Mapping[str, Any],
) -> OutputHead:
    """The output layer ``head`` of a ready-made model whose mixin loss is ``loss``.

    ``loss="as_softmax"`` trains the head with AS-Softmax (the mixin passes ``delta``),
    ``loss="softmax"`` with the head's own loss; the ``dense`` head also takes any other member
    of the softmax family. ``class_counts`` reach the heads that take them unless ``head_kwargs``
    has its own.
    """
    check_head_name(head)
    if head_kwargs is not None and not isinstance(head_kwargs, Mapping):
        raise TypeError(f"{owner}: head_kwargs must be a mapping of keyword arguments for head {head!r}, got {head_kwargs!r}.")
    kwargs = dict(head_kwargs or {})
    accepted = head_kwarg_names(head)
    if "loss" in kwargs or "loss_kwargs" in kwargs:
        raise ValueError(
            f"{owner}: set the loss with the model's loss= and loss_kwargs= options, not in head_kwargs."
        )
    if head == "dense":
        if loss not in ("as_softmax", "softmax"):
            kwargs.update(loss=loss, loss_kwargs=dict(loss_kwargs))
    elif loss not in ("as_softmax", "softmax"):
        raise ValueError(
            f"{owner}: head {head!r} trains with its own objective; use loss='as_softmax' (AS-Softmax "
            f"on the head, with delta) or loss='softmax' (the head's plain loss), got loss={loss!r}. "
            "Other members of the softmax family need head='dense' (or head=None)."
        )
    elif loss == "as_softmax" and not HEADS[head].supports_delta:
        raise ValueError(
            f"{owner}: head {head!r} has no AS-Softmax form (it trains binary target-vs-noise "
            "classifiers); use loss='softmax' with it."
        )
    if class_counts is not None and "class_counts" in accepted and "class_counts" not in kwargs:
        kwargs["class_counts"] = class_counts
    return build_head(head, in_features, num_classes, **kwargs)


def keep_class_counts_if_used(
    model: HyperparametersMixin, head: str | None, class_counts: Sequence[float] | None
) -> list[int] | None:
    """``class_counts`` as a list of ints if the output layer ``head`` takes them, else ``None``;
    the model's saved hyperparameters get the same value (one count per class is a long list to
    keep in every checkpoint and ``hparams.yaml`` of a model that never reads it)."""
    used = head is not None and "class_counts" in head_kwarg_names(check_head_name(head))
    value = [int(c) for c in class_counts] if used and class_counts is not None else None
    for attribute in ("_hparams", "_hparams_initial"):
        hparams = getattr(model, attribute, None)
        if hparams is not None and "class_counts" in hparams:
            hparams["class_counts"] = value
    return value


def check_class_names(owner: str, class_names: Sequence[str] | None, num_classes: int) -> list[str] | None:
    """``class_names`` as a list of ``num_classes`` strings (or ``None``), for the label names a
    checkpoint carries (the CLI copies the datamodule's ``class_names``)."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"{owner}: class_names must be a list of label names, got {class_names!r}.")
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"{owner}: class_names has {len(names)} names for num_classes={num_classes}; give one name "
            "per class, in the order of the model's outputs."
        )
    return names
