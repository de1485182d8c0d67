"""``build_loss``: the softmax family behind one name, and the matching classifier head."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from lightning_assoftmax.family.am_softmax import AMSoftmaxLoss, CosineClassifier
from lightning_assoftmax.family.entmax import Entmax15Loss, SparsemaxLoss
from lightning_assoftmax.family.softmax import (
    LabelSmoothingLoss,
    SoftmaxLoss,
    TemperatureSoftmaxLoss,
)
from lightning_assoftmax.family.sparse_softmax import SparseSoftmaxLoss
from lightning_assoftmax.losses import ASSoftmaxLoss

__all__ = ["LOSSES", "LOSS_NAMES", "build_loss", "classifier_head", "loss_kwarg_names"]

#: name -> class; every class takes ``ignore_index`` and ``reduction`` besides its own keywords.
LOSSES: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxLoss,
    "t_softmax": TemperatureSoftmaxLoss,
    "sparse_softmax": SparseSoftmaxLoss,
    "sparsemax": SparsemaxLoss,
    "entmax15": Entmax15Loss,
    "label_smoothing": LabelSmoothingLoss,
    "am_softmax": AMSoftmaxLoss,
    "as_softmax": ASSoftmaxLoss,
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def check_loss_name(name: str) -> str:
    """Return ``name`` if it is a known loss, else raise a ``ValueError`` listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a string, one of {', '.join(LOSS_NAMES)}; got {name!r}.")
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}. Known losses: {', '.join(LOSS_NAMES)}.")
    return name


def loss_kwarg_names(name: str) -> tuple[str, ...]:
    """The keyword arguments the loss ``name`` accepts (``ignore_index`` and ``reduction`` included)."""
    init = inspect.signature(LOSSES[check_loss_name(name)].__init__)
    return tuple(p for p in init.parameters if p != "self")


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the softmax-family loss called ``name``; a module taking ``(logits, target)``.

    Every loss follows ``F.cross_entropy``'s conventions: logits ``(N, C)`` or ``(N, C, d1, ...)``,
    integer target ``(N)`` / ``(N, d1, ...)``, ``ignore_index`` (default -100; those positions get
    neither loss nor gradient) and ``reduction`` (``"mean"`` over non-ignored elements, 0 when
    there are none; ``"sum"``; ``"none"`` shaped like the target, 0 at ignored positions).
    Besides ``forward`` each module has ``loss_and_stats(logits, target)`` (loss, masked count,
    valid count), ``predictive_logits(logits)`` and the attributes ``name`` and
    ``produces_masked_samples``.

    ==================  ==============================================  ======================
    name                loss                                            keywords (defaults)
    ==================  ==============================================  ======================
    ``softmax``         cross entropy                                   --
    ``t_softmax``       cross entropy of ``logits / temperature``        ``temperature=2.0``
    ``sparse_softmax``  top-k softmax (Sun et al. 2021)                 ``k=10``
    ``sparsemax``       sparsemax loss (Martins & Astudillo 2016)       -- (needs ``entmax``)
    ``entmax15``        1.5-entmax loss (Peters et al. 2019)            -- (needs ``entmax``)
    ``label_smoothing`` smoothed-target cross entropy                   ``smoothing=0.1``
    ``am_softmax``      additive margin over cosines (Wang et al. 2018) ``scale=30, margin=0.35``
    ``as_softmax``      Adaptive Sparse Softmax (Lv et al. 2025)        ``delta=0.1``
    ==================  ==============================================  ======================

    ``am_softmax`` expects cosine logits: give the model :func:`classifier_head` with the same
    name, which returns a :class:`~lightning_assoftmax.family.CosineClassifier`.

    Example:
        >>> import torch
        >>> criterion = build_loss("sparse_softmax", k=2)
        >>> criterion(torch.tensor([[3.0, 1.0, 0.0, -9.0]]), torch.tensor([0]))
        tensor(0.1269)
        >>> build_loss("cross_entropy")
        Traceback (most recent call last):
        ...
        ValueError: Unknown loss 'cross_entropy'. Known losses: softmax, t_softmax, sparse_softmax, sparsemax, entmax15, label_smoothing, am_softmax, as_softmax.
    """
    accepted = loss_kwarg_names(name)
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise TypeError(
            f"build_loss({name!r}) got unexpected keyword argument(s) {', '.join(unexpected)}; "
            f"{name!r} accepts: {', '.join(accepted)}."
        )
    return LOSSES[name](**kwargs)


def classifier_head(in_features: int, num_classes: int, loss: str = "softmax", bias: bool = True) -> nn.Module:
    """The output layer that suits ``loss``: a :class:`CosineClassifier` for ``am_softmax``
    (whose loss needs cosines; ``bias`` is then ignored), ``nn.Linear`` for every other loss.

    Example:
        >>> classifier_head(384, 5, loss="am_softmax")
        CosineClassifier(in_features=384, num_classes=5)
        >>> classifier_head(384, 5, loss="sparsemax")
        Linear(in_features=384, out_features=5, bias=True)
    """
    if check_loss_name(loss) == "am_softmax":
        return CosineClassifier(in_features, num_classes)
    return nn.Linear(in_features, num_classes, bias=bias)
