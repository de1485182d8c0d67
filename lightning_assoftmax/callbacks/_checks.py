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


def warn_if_loss_never_masks(pl_module: pl.LightningModule, callback: str, effect: str) -> None:
    """Says once, at fit start, that ``callback`` will do nothing: the module's loss (a mixin
    option) never gives a sample an exact zero loss, so no sample is ever masked."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    if getattr(pl_module, "as_softmax_reports_masked", True) is not False:
        return
    loss = getattr(pl_module, "as_softmax_loss_description", None) or getattr(pl_module, "as_softmax_loss_name", "?")
    rank_zero_warn(
        f"{callback} will do nothing in this fit: the loss {loss} never masks a sample (no sample "
        f"reaches an exact zero loss), so {effect}. Train with loss='as_softmax' (or sparsemax, "
        "entmax15, a large-margin loss with delta in loss_kwargs), or remove the callback."
    )
