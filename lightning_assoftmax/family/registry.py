"""``build_loss``: the softmax family behind one name, and the matching classifier head."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_assoftmax.family.am_softmax import AMSoftmaxLoss, CosFaceLoss, CosineClassifier
from lightning_assoftmax.family.classifiers import (
    NormalizedFeatureClassifier,
    NormPreservingClassifier,
)
from lightning_assoftmax.family.cosine_margin import ArcFaceLoss, NormFaceLoss
from lightning_assoftmax.family.entmax import Entmax15Loss, SparsemaxLoss
from lightning_assoftmax.family.l2_softmax import L2SoftmaxLoss
from lightning_assoftmax.family.l_softmax import LargeMarginSoftmaxLoss, SphereFaceLoss
from lightning_assoftmax.family.softmax import (
    LabelSmoothingLoss,
    SoftmaxLoss,
    TemperatureSoftmaxLoss,
)
from lightning_assoftmax.family.sparse_softmax import SparseSoftmaxLoss
from lightning_assoftmax.family.weighted_softmax import WeightedSoftmaxLoss
from lightning_assoftmax.losses import ASSoftmaxLoss

__all__ = ["HEADS", "LOSSES", "LOSS_NAMES", "build_loss", "classifier_head", "loss_kwarg_names"]

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
    # the large-margin family (each also takes delta: AS-Softmax on its margin logits)
    "l_softmax": LargeMarginSoftmaxLoss,
    "sphereface": SphereFaceLoss,
    "l2_softmax": L2SoftmaxLoss,
    "normface": NormFaceLoss,
    "cosface": CosFaceLoss,
    "arcface": ArcFaceLoss,
    "weighted_softmax": WeightedSoftmaxLoss,
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)

#: name -> the output layer its loss needs, ``(in_features, num_classes, bias) -> module``;
#: ``nn.Linear`` for the names not listed.
HEADS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "am_softmax": lambda i, c, bias: CosineClassifier(i, c),
    "cosface": lambda i, c, bias: CosineClassifier(i, c),
    "normface": lambda i, c, bias: CosineClassifier(i, c),
    "arcface": lambda i, c, bias: CosineClassifier(i, c),
    "l_softmax": lambda i, c, bias: NormPreservingClassifier(i, c),
    "sphereface": lambda i, c, bias: NormPreservingClassifier(i, c, normalize_weights=True),
    "l2_softmax": lambda i, c, bias: NormalizedFeatureClassifier(i, c, bias=bias),
}


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

    ====================  ==============================================  ==========================
    name                  loss                                            keywords (defaults)
    ====================  ==============================================  ==========================
    ``softmax``           cross entropy                                   --
    ``t_softmax``         cross entropy of ``logits / temperature``        ``temperature=2.0``
    ``sparse_softmax``    top-k softmax (Sun et al. 2021)                 ``k=10``
    ``sparsemax``         sparsemax loss (Martins & Astudillo 2016)       -- (needs ``entmax``)
    ``entmax15``          1.5-entmax loss (Peters et al. 2019)            -- (needs ``entmax``)
    ``label_smoothing``   smoothed-target cross entropy                   ``smoothing=0.1``
    ``am_softmax``        additive cosine margin (Wang et al. 2018)       ``scale=30, margin=0.35``
    ``as_softmax``        Adaptive Sparse Softmax (Lv et al. 2025)        ``delta=0.1``
    ``l_softmax``         L-Softmax (Liu et al. 2016)                     ``margin=4, lam=0``
    ``sphereface``        A-Softmax (Liu et al. 2017)                     ``margin=4, lam=0``
    ``l2_softmax``        L2-constrained softmax (Ranjan et al. 2017)     ``alpha=30``
    ``normface``          scaled cosines (Wang et al. 2017)               ``scale=30``
    ``cosface``           = ``am_softmax`` (Wang et al. 2018)             ``scale=30, margin=0.35``
    ``arcface``           additive angular margin (Deng et al. 2019)      ``scale=30, margin=0.5``
    ``weighted_softmax``  class-weighted cross entropy                    ``weight="balanced"``
    ====================  ==============================================  ==========================

    The large-margin members (``am_softmax`` and every name after ``as_softmax``) also take
    ``delta`` (default ``None``): their margin logits then go through AS-Softmax's keep mask
    before the cross entropy (see :class:`~lightning_assoftmax.family.MarginLoss`).
    Several need their own output layer: give the model :func:`classifier_head` with the same
    name (a cosine classifier for ``am_softmax``, ``cosface``, ``normface`` and ``arcface``, a
    norm-preserving one for ``l_softmax`` and ``sphereface``, a normalised-feature one for
    ``l2_softmax``).

    Example:
        >>> import torch
        >>> criterion = build_loss("sparse_softmax", k=2)
        >>> criterion(torch.tensor([[3.0, 1.0, 0.0, -9.0]]), torch.tensor([0]))
        tensor(0.1269)
        >>> build_loss("cross_entropy")
        Traceback (most recent call last):
        ...
        ValueError: Unknown loss 'cross_entropy'. Known losses: softmax, t_softmax, sparse_softmax, sparsemax, entmax15, label_smoothing, am_softmax, as_softmax, l_softmax, sphereface, l2_softmax, normface, cosface, arcface, weighted_softmax.
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
    """The output layer that suits ``loss``, ``(..., in_features) -> (..., num_classes)``.

    * ``am_softmax``, ``cosface``, ``normface``, ``arcface``: a :class:`CosineClassifier`
      (cosines in ``[-1, 1]``; ``bias`` is ignored);
    * ``l_softmax``: a bias-free :class:`~lightning_assoftmax.family.NormPreservingClassifier`
      (logits ``W x`` carrying the norms of ``x`` and of each ``W_j``); ``sphereface``: the same
      with unit-norm class weights (logits ``|x| cos(theta_j)``);
    * ``l2_softmax``: a :class:`~lightning_assoftmax.family.NormalizedFeatureClassifier` (a
      linear layer over unit-norm features);
    * every other loss: ``nn.Linear``.

    In each case the argmax of the layer's output is the model's prediction (margins enter the
    loss only).

    Example:
        >>> classifier_head(384, 5, loss="am_softmax")
        CosineClassifier(in_features=384, num_classes=5)
        >>> classifier_head(384, 5, loss="sphereface")
        NormPreservingClassifier(in_features=384, num_classes=5, normalize_weights=True)
        >>> classifier_head(384, 5, loss="sparsemax")
        Linear(in_features=384, out_features=5, bias=True)
    """
    make = HEADS.get(check_loss_name(loss))
    if make is not None:
        return make(in_features, num_classes, bias)
    return nn.Linear(in_features, num_classes, bias=bias)
