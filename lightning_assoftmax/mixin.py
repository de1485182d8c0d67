"""``ASSoftmaxMixin``: the AS-Softmax loss (or another softmax-family loss) and its metrics
inside any ``LightningModule``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.family import build_loss, check_loss_name, loss_kwarg_names
from lightning_assoftmax.functional import (
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)
from lightning_assoftmax.functional._checks import check_delta, check_flag, check_ignore_index
from lightning_assoftmax.metrics import WeightedMean
from lightning_assoftmax.ops import compute_dtype

__all__ = ["ASSoftmaxMixin"]

# Multi-label targets only have the AS-Softmax loss and its delta=1 base loss.
MULTILABEL_LOSSES = ("as_softmax", "softmax")


def _stage_keys(stage: str, masked_ratio: bool) -> tuple[str, ...]:
    keys = ("loss", "masked_ratio") if masked_ratio else ("loss",)
    return keys if stage == "train" else keys + ("ce_loss", "acc")


class ASSoftmaxMixin:
    """Adds ``as_softmax_loss(logits, target)`` and its logging to a ``LightningModule``.

    List the mixin *before* ``LightningModule`` and pass ``delta`` through ``super().__init__``::

        class MyModel(ASSoftmaxMixin, L.LightningModule):
            def __init__(self, hidden: int = 64, delta: float = 0.1):
                super().__init__(delta=delta)
                self.save_hyperparameters()
                ...

            def training_step(self, batch, batch_idx):
                x, y = batch
                return self.as_softmax_loss(self(x), y)

    In a running ``Trainer`` the method logs ``<stage>/loss`` and ``<stage>/masked_ratio`` for
    ``train`` (per step and per epoch), ``val`` and ``test`` (per epoch), plus ``<stage>/ce_loss``
    (plain cross entropy on the same logits) and ``<stage>/acc`` in validation and test. Epoch
    values are exact means over all non-ignored samples of all processes (torchmetrics states).

    Another member of the softmax family (see :func:`~lightning_assoftmax.build_loss`) replaces
    AS-Softmax with ``loss="sparsemax"`` (and its keywords in ``loss_kwargs``); the method keeps
    its name and logs the same keys, except that ``<stage>/masked_ratio`` (share of samples whose
    loss is exactly zero) is logged only for losses that can zero a sample out (``as_softmax``,
    ``sparsemax``, ``entmax15``, ``sparse_softmax`` with ``k=1``). ``<stage>/ce_loss`` is the plain
    cross entropy of the loss's ``predictive_logits`` (the raw logits, ``logits / temperature`` for
    ``t_softmax``, ``scale * cosines`` for ``am_softmax``). For ``am_softmax`` give the model the
    cosine head ``classifier_head(in_features, num_classes, loss="am_softmax")``.

    Args:
        delta: the AS-Softmax margin in ``[0, 1]`` (paper: 0.1; 1 is plain cross entropy); used
            by ``loss="as_softmax"`` only.
        multilabel: targets are 0/1 tensors shaped like the logits (multi-label AS-Softmax); the
            logged ``acc`` is then label-wise accuracy at the score threshold 0 and ``ce_loss``
            the unmasked multi-label base loss. Only ``as_softmax`` and ``softmax`` (its
            ``delta=1`` base loss) exist for multi-label targets.
        ignore_index: target value to skip (single-label only).
        loss: name of the loss, one of :data:`lightning_assoftmax.family.LOSS_NAMES`.
        loss_kwargs: keywords of that loss (e.g. ``{"k": 3}`` for ``sparse_softmax``); not
            ``ignore_index`` or ``reduction`` (the mixin sets them), nor ``delta`` (an argument
            of its own).

    Attributes:
        as_softmax_delta: the delta used for the *training* loss; ``DeltaWarmup`` moves it.
        as_softmax_target_delta: the configured delta, used for validation and test losses so
            that their values stay comparable across epochs.
        as_softmax_last_stats: ``(masked_count, valid_count)`` of the latest training batch
            (0-dim tensors), read by ``AdaptiveGradAccumulation``. ``masked_count`` counts
            exactly-zero losses, and is 0 for losses that cannot zero a sample out, so that
            accumulation stays at one batch per step for them.
        as_softmax_criterion: the loss module (``None`` for multi-label targets).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        modules = [i for i, base in enumerate(mro) if base is nn.Module]
        if modules and mro.index(ASSoftmaxMixin) > modules[0]:
            raise TypeError(
                f"{cls.__name__}: list ASSoftmaxMixin before LightningModule in the base classes, "
                f"e.g. `class {cls.__name__}(ASSoftmaxMixin, L.LightningModule)`, so that its "
                "keyword arguments (delta, ...) are consumed before nn.Module.__init__."
            )

    def __init__(
        self,
        *args: Any,
        delta: float = 0.1,
        multilabel: bool = False,
        ignore_index: int = -100,
        loss: str = "as_softmax",
        loss_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.as_softmax_target_delta = check_delta(delta)
        self.as_softmax_delta = self.as_softmax_target_delta
        self.as_softmax_multilabel = check_flag(
            "multilabel",
            multilabel,
            " Use multilabel=True for 0/1 targets shaped like the logits, False (the default) for "
            "class indices.",
        )
        self.as_softmax_ignore_index = check_ignore_index(ignore_index)
        self.as_softmax_loss_name = check_loss_name(loss)
        self.as_softmax_loss_kwargs = dict(loss_kwargs) if isinstance(loss_kwargs, Mapping) else {}
        self.as_softmax_criterion = self._as_softmax_build_criterion(loss, loss_kwargs)
        if self.as_softmax_criterion is None:
            self.as_softmax_reports_masked = loss == "as_softmax"
        else:
            self.as_softmax_reports_masked = bool(self.as_softmax_criterion.produces_masked_samples)
        self.as_softmax_last_stats: tuple[Tensor, Tensor] | None = None
        self.as_softmax_metrics = nn.ModuleDict(
            {
                f"{stage}_{key}": WeightedMean()
                for stage in ("train", "val", "test")
                for key in _stage_keys(stage, self.as_softmax_reports_masked)
            }
        )

    # -- public API -------------------------------------------------------------------------
    def as_softmax_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The (mean) loss of a batch (AS-Softmax unless ``loss=`` chose another); logs it when
        called inside a ``Trainer`` loop.

        Shapes as ``F.cross_entropy``: logits ``(N, C)`` or ``(N, C, d1, ...)``, target ``(N)`` or
        ``(N, d1, ...)``; for ``multilabel=True`` the target is 0/1 shaped like the logits.
        """
        stage = self._as_softmax_stage()
        delta = self.as_softmax_delta if stage in (None, "train") else self.as_softmax_target_delta
        criterion = self.as_softmax_criterion
        if criterion is None:
            if self.as_softmax_loss_name != "as_softmax":
                delta = 1.0
            loss, masked, count = multilabel_as_softmax_loss_and_stats(logits, target, delta)
            if not self.as_softmax_reports_masked:
                masked = torch.zeros_like(masked)
        else:
            if self.as_softmax_loss_name == "as_softmax":
                criterion.delta = delta  # DeltaWarmup moves the training delta between batches
            loss, masked, count = criterion.loss_and_stats(logits, target)
        if stage == "train":
            self.as_softmax_last_stats = (masked, count)
        if stage is not None:
            self._as_softmax_log(stage, loss, masked, count, logits, target)
        return loss

    # -- internals --------------------------------------------------------------------------
    def _as_softmax_build_criterion(self, loss: str, loss_kwargs: Mapping[str, Any] | None) -> nn.Module | None:
        if loss_kwargs is None:
            loss_kwargs = {}
        if not isinstance(loss_kwargs, Mapping):
            raise TypeError(
                f"loss_kwargs must be a mapping of keyword arguments for loss {loss!r} (e.g. "
                f"{{'k': 3}}) or None, got {loss_kwargs!r}."
            )
        own = [key for key in loss_kwargs if key in ("ignore_index", "reduction", "delta")]
        if own:
            raise ValueError(
                f"loss_kwargs must not set {', '.join(own)}: pass ignore_index and delta to the "
                "mixin itself (ASSoftmaxMixin.__init__(..., ignore_index=..., delta=...)); the "
                "reduction is always the mean."
            )
        if self.as_softmax_multilabel:
            if loss not in MULTILABEL_LOSSES:
                raise ValueError(
                    f"loss={loss!r} has no multi-label form; with multilabel=True use one of "
                    f"{', '.join(MULTILABEL_LOSSES)} ('softmax' is the multi-label base loss, i.e. "
                    "AS-Softmax with delta=1)."
                )
            if loss_kwargs:
                raise ValueError(
                    f"loss_kwargs {dict(loss_kwargs)!r} given with multilabel=True; the multi-label "
                    "losses take no keywords (set delta on the mixin)."
                )
            return None
        own_kwargs: dict[str, Any] = {"ignore_index": self.as_softmax_ignore_index}
        if loss == "as_softmax":
            own_kwargs["delta"] = self.as_softmax_target_delta
        accepted = [k for k in loss_kwarg_names(loss) if k not in ("ignore_index", "reduction", "delta")]
        unexpected = sorted(set(loss_kwargs) - set(accepted))
        if unexpected:
            raise TypeError(
                f"loss_kwargs for loss={loss!r} has unexpected key(s) {', '.join(unexpected)}; "
                f"{loss!r} accepts: {', '.join(accepted) if accepted else 'no keywords'}."
            )
        return build_loss(loss, **own_kwargs, **loss_kwargs)

    def _as_softmax_stage(self) -> str | None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return None
        if trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        if trainer.testing:
            return "test"
        return None

    @torch.no_grad()
    def _as_softmax_plain_stats(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Summed plain loss and the number of correct predictions (for ce_loss and acc)."""
        if self.as_softmax_multilabel:
            ce = multilabel_as_softmax_loss(logits, target, 1.0, reduction="sum")
            correct = ((logits > 0) == (target > 0.5)).float().mean(dim=1).sum()
            return ce, correct
        scores = self.as_softmax_criterion.predictive_logits(logits.to(compute_dtype(logits.dtype)))
        ce = F.cross_entropy(scores, target, ignore_index=self.as_softmax_ignore_index, reduction="sum")
        valid = target != self.as_softmax_ignore_index
        correct = ((logits.argmax(dim=1) == target) & valid).sum()
        return ce, correct

    def _as_softmax_log(
        self, stage: str, loss: Tensor, masked: Tensor, count: Tensor, logits: Tensor, target: Tensor
    ) -> None:
        if int(count) == 0:  # an all-ignored batch adds nothing to a mean
            return
        weight = count.float()
        values = {"loss": loss.detach()}
        if self.as_softmax_reports_masked:
            values["masked_ratio"] = masked.float() / weight
        if stage != "train":
            ce_sum, correct = self._as_softmax_plain_stats(logits.detach(), target)
            values["ce_loss"] = ce_sum / weight
            values["acc"] = correct.float() / weight
        on_step = stage == "train"
        for key, value in values.items():
            metric = self.as_softmax_metrics[f"{stage}_{key}"]
            if on_step:
                metric(value.float(), weight)  # forward: Lightning logs the batch value too
            else:
                metric.update(value.float(), weight)
            self.log(
                f"{stage}/{key}",
                metric,
                on_step=on_step,
                on_epoch=True,
                prog_bar=key in ("loss", "acc", "masked_ratio"),
                batch_size=int(count),
            )
