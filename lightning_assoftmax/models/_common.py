"""What the ready-made models share: the optimizer, its learning-rate schedule and the choice of
output layer."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from lightning_assoftmax.functional._checks import check_real
from lightning_assoftmax.heads import (
    HEADS,
    OutputHead,
    build_head,
    check_head_name,
    head_kwarg_names,
)

__all__ = [
    "LR_SCHEDULES",
    "LR_SCHEDULE_ARGS",
    "TrainingProgressLR",
    "adamw",
    "check_class_names",
    "check_lr_schedule",
    "keep_class_counts_if_used",
    "lr_factor",
    "optimizers_with_schedule",
    "output_head",
    "training_progress",
    "with_lr_schedule_args",
]

#: Learning-rate schedules of the ready-made models (``lr_schedule=``).
LR_SCHEDULES = ("constant", "linear")

#: The ``Args`` entries of ``lr_schedule`` and ``warmup_fraction``, which every ready-made model
#: takes; :func:`with_lr_schedule_args` puts them in its docstring.
LR_SCHEDULE_ARGS = """\
lr_schedule: ``"constant"`` (default) or ``"linear"``: after the warm-up, keep the
    learning rate or decay it linearly to 0 at the end of training. Placed by the share of
    training done (epochs and batches of ``max_epochs``, or steps of ``max_steps``), so
    the decay ends at the last batch also when ``AdaptiveGradAccumulation`` takes fewer
    optimizer steps than planned or ``SkipMaskedSamples`` shortens epochs (see
    :func:`~lightning_assoftmax.models._common.training_progress`).
warmup_fraction: share of training over which the learning rate rises linearly from 0
    to ``lr`` (in [0, 1); 0: no warm-up).
"""

_LR_SCHEDULE_PLACEHOLDER = re.compile(r"^( *)\{lr_schedule_args\}\n", re.MULTILINE)


def with_lr_schedule_args(cls: type) -> type:
    """Class decorator: the docstring's line ``{lr_schedule_args}`` replaced by
    :data:`LR_SCHEDULE_ARGS`, indented as that line (the CLI's help reads them from there)."""
    doc = cls.__doc__
    if doc is None:  # python -OO strips docstrings
        return cls
    if not _LR_SCHEDULE_PLACEHOLDER.search(doc):
        raise TypeError(f"{cls.__name__}: its docstring has no line '{{lr_schedule_args}}' to fill.")
    cls.__doc__ = _LR_SCHEDULE_PLACEHOLDER.sub(
        lambda match: textwrap.indent(LR_SCHEDULE_ARGS, match.group(1)), doc, count=1
    )
    return cls


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


def check_lr_schedule(owner: str, lr_schedule: str, warmup_fraction: float) -> tuple[str, float]:
    """``(lr_schedule, warmup_fraction)`` checked: a name of :data:`LR_SCHEDULES` and a share in [0, 1)."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"{owner}: lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {lr_schedule!r}. "
            "'linear' decays the learning rate to 0 at the end of training (after the warm-up), "
            "'constant' keeps it after the warm-up."
        )
    warmup_fraction = check_real(
        warmup_fraction, f"{owner}: warmup_fraction", low=0.0, high=1.0, low_inclusive=True,
        hint="It is the share of training spent raising the learning rate from 0; 0 means no warm-up.",
    )
    return lr_schedule, warmup_fraction


def lr_factor(progress: float, lr_schedule: str, warmup_fraction: float) -> float:
    r"""Multiplier of the peak learning rate at training progress :math:`p \in [0, 1]`.

    .. math:: f(p) = \begin{cases} p / w & p < w \\ 1 & \text{constant} \\
              \max(0, (1 - p) / (1 - w)) & \text{linear} \end{cases}

    with :math:`w` the warm-up fraction: a linear warm-up from 0, then constant or a linear decay
    to 0 at :math:`p = 1` (``transformers``' ``get_linear_schedule_with_warmup`` and
    ``get_constant_schedule_with_warmup`` with :math:`p` = step / total steps).
    """
    if progress < warmup_fraction:
        return progress / warmup_fraction
    if lr_schedule == "constant":
        return 1.0
    return max(0.0, (1.0 - progress) / (1.0 - warmup_fraction))


def training_progress(trainer: L.Trainer) -> float:
    """Share of the planned training done, in [0, 1].

    Measured in data, not in optimizer steps: epochs done, the current one counted by its
    training batches run, over ``max_epochs``; or optimizer steps over ``max_steps``; whichever
    is further along (training stops at the first limit reached). With a constant
    ``accumulate_grad_batches`` this is optimizer steps / ``trainer.estimated_stepping_batches``
    (up to a short last window per epoch). With ``AdaptiveGradAccumulation``, which takes fewer
    steps than that estimate, or ``SkipMaskedSamples``, which shortens epochs, it still reaches 1
    at the end of the last epoch.
    """
    parts = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        batches = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        within = done / batches if math.isfinite(batches) and batches > 0 else 0.0
        parts.append((trainer.current_epoch + min(within, 1.0)) / trainer.max_epochs)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        parts.append(trainer.global_step / trainer.max_steps)
    return min(1.0, max(parts, default=0.0))


class TrainingProgressLR(LRScheduler):
    """Sets each parameter group's learning rate to ``base_lr * lr_factor(progress())``.

    A step-interval scheduler (Lightning steps it after every optimizer step) whose position is
    ``progress()``, the share of training done (:func:`training_progress`), rather than its own
    step count. The progress function is not part of the ``state_dict``: it reads the trainer,
    whose loop counters a checkpoint restores.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        progress: Callable[[], float],
        lr_schedule: str = "linear",
        warmup_fraction: float = 0.0,
    ) -> None:
        self.lr_schedule, self.warmup_fraction = check_lr_schedule(type(self).__name__, lr_schedule, warmup_fraction)
        self._progress = progress
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = lr_factor(self._progress(), self.lr_schedule, self.warmup_fraction)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_progress")}


def optimizers_with_schedule(
    module: L.LightningModule, optimizer: torch.optim.Optimizer, lr_schedule: str, warmup_fraction: float
) -> torch.optim.Optimizer | dict[str, Any]:
    """What ``configure_optimizers`` returns: ``optimizer`` alone for a constant learning rate
    without warm-up, else ``optimizer`` with a :class:`TrainingProgressLR` stepped after every
    optimizer step (``interval="step"``)."""
    if lr_schedule == "constant" and warmup_fraction == 0:
        return optimizer
    trainer = module.trainer
    if (trainer.max_epochs is None or trainer.max_epochs < 0) and (trainer.max_steps is None or trainer.max_steps < 0):
        raise ValueError(
            f"{type(module).__name__}: lr_schedule={lr_schedule!r} with warmup_fraction={warmup_fraction} "
            "needs a finite training length to place the warm-up and the decay: set "
            "Trainer(max_epochs=...) or Trainer(max_steps=...), or use lr_schedule='constant' with "
            "warmup_fraction=0."
        )
    scheduler = TrainingProgressLR(optimizer, lambda: training_progress(trainer), lr_schedule, warmup_fraction)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


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
