"""Checks shared by the bundle's callbacks."""

from __future__ import annotations

import lightning.pytorch as pl


def require_mixin(pl_module: pl.LightningModule, callback: str) -> None:
    from lightning_assoftmax.mixin import ASSoftmaxMixin

    if not isinstance(pl_module, ASSoftmaxMixin):
        raise TypeError(
            f"{callback} needs a LightningModule that uses ASSoftmaxMixin, got "
            f"{type(pl_module).__name__}. Declare it as `class {type(pl_module).__name__}"
            "(ASSoftmaxMixin, L.LightningModule)` and compute the loss with "
            "`self.as_softmax_loss(logits, target)`."
        )
