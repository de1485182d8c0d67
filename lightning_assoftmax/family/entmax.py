r"""Sparsemax and 1.5-entmax losses, computed by the ``entmax`` package (optional extra ``baselines``).

Both are Fenchel-Young losses (Blondel et al., 2020) of sparse probability mappings:
sparsemax (Martins & Astudillo, ICML 2016, arXiv 1602.02068) is the Euclidean projection of the
logits onto the simplex, 1.5-entmax (Peters, Niculae & Martins, ACL 2019, arXiv 1905.05702) sits
between it and softmax. With :math:`p^\star` the mapping of :math:`z`,

.. math:: \ell(z, t) = \Omega(e_t) - \Omega(p^\star) + \langle p^\star - e_t, z\rangle ,

whose gradient is :math:`p^\star - e_t`. Both reach an exact zero loss with a zero gradient once
:math:`p^\star = e_t`, i.e. once the target logit leads every other one by at least 1 (sparsemax)
or 2 (1.5-entmax): they report masked samples like AS-Softmax does.

The package's own ``ignore_index`` only acts for non-negative values (the default -100 is a no-op
there), so ignored positions are dropped here before its loss is called.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_assoftmax.family.base import FamilyLoss

__all__ = ["Entmax15Loss", "SparsemaxLoss"]


def _entmax_losses() -> Any:
    try:
        from entmax import losses
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The sparsemax and entmax15 losses need the `entmax` package: "
            "pip install 'lightning-assoftmax[baselines]' (or `pip install entmax`)."
        ) from err
    return losses


class SparsemaxLoss(FamilyLoss):
    """Sparsemax loss (Martins & Astudillo, 2016) on the non-ignored rows, via ``entmax``."""

    name = "sparsemax"
    produces_masked_samples = True

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self._loss = _entmax_losses().sparsemax_loss

    def row_losses(self, logits: Tensor, target: Tensor) -> Tensor:
        return self._loss(logits, target)


class Entmax15Loss(FamilyLoss):
    """1.5-entmax loss (Peters et al., 2019) on the non-ignored rows, via ``entmax``."""

    name = "entmax15"
    produces_masked_samples = True

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(ignore_index=ignore_index, reduction=reduction)
        self._loss = _entmax_losses().entmax15_loss

    def row_losses(self, logits: Tensor, target: Tensor) -> Tensor:
        return self._loss(logits, target)
