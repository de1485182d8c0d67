"""``build_head``: the output layers behind one name."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_assoftmax.heads.adaptive import AdaptiveSoftmaxHead
from lightning_assoftmax.heads.base import OutputHead
from lightning_assoftmax.heads.class_based import ClassBasedSoftmaxHead
from lightning_assoftmax.heads.dense import DenseHead
from lightning_assoftmax.heads.hierarchical import HierarchicalSoftmaxHead
from lightning_assoftmax.heads.nce import NCEHead
from lightning_assoftmax.heads.sampled import SampledSoftmaxHead

__all__ = ["HEADS", "HEAD_NAMES", "build_head", "check_head_name", "head_kwarg_names"]

#: name -> class; each takes ``(in_features, num_classes, **kwargs)``.
HEADS: dict[str, type[OutputHead]] = {
    "dense": DenseHead,
    "adaptive": AdaptiveSoftmaxHead,
    "class_based": ClassBasedSoftmaxHead,
    "hierarchical": HierarchicalSoftmaxHead,
    "sampled": SampledSoftmaxHead,
    "nce": NCEHead,
}
HEAD_NAMES: tuple[str, ...] = tuple(HEADS)


def check_head_name(name: str) -> str:
    """Return ``name`` if it is a known head, else raise a ``ValueError`` listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"head name must be a string, one of {', '.join(HEAD_NAMES)}; got {name!r}.")
    if name not in HEADS:
        raise ValueError(f"Unknown head {name!r}. Known heads: {', '.join(HEAD_NAMES)}.")
    return name


def head_kwarg_names(name: str) -> tuple[str, ...]:
    """The keyword arguments of head ``name`` besides ``in_features`` and ``num_classes``."""
    init = inspect.signature(HEADS[check_head_name(name)].__init__)
    return tuple(p for p in init.parameters if p not in ("self", "in_features", "num_classes"))


def build_head(name: str, in_features: int, num_classes: int, **kwargs: Any) -> OutputHead:
    """Build the output layer ``name``: an ``nn.Module`` that owns the class weights.

    Every head has ``loss(hidden, target, *, delta=None, ignore_index=-100, reduction="mean")``,
    ``loss_and_stats(...)`` (plus masked and valid counts), ``log_prob(hidden)`` (the exact,
    normalised ``(..., V)`` log-probabilities) and ``predict(hidden)``.

    ================  ===================================================  ==========================
    name              output layer                                         AS-Softmax (``delta``)
    ================  ===================================================  ==========================
    ``dense``         linear + any ``build_loss`` loss; ``z_loss``         exact
    ``adaptive``      adaptive softmax (Grave et al. 2017)                 exact, pruned by cluster
    ``class_based``   class-based softmax (Goodman 2001)                   exact, pruned by cluster
    ``hierarchical``  Huffman-tree hierarchical softmax (Morin & Bengio    exact, pruned by subtree
                      2005; word2vec)
    ``sampled``       sampled softmax (Jean et al. 2015); ``z_loss``       over the sampled classes
    ``nce``           NCE / negative sampling (Mnih & Teh 2012;            refused
                      Mikolov et al. 2013)
    ================  ===================================================  ==========================

    Example:
        >>> head = build_head("hierarchical", 64, 1000)
        >>> type(head).__name__
        'HierarchicalSoftmaxHead'
        >>> build_head("softmax_tree", 64, 1000)
        Traceback (most recent call last):
        ...
        ValueError: Unknown head 'softmax_tree'. Known heads: dense, adaptive, class_based, hierarchical, sampled, nce.
    """
    accepted = head_kwarg_names(name)
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise TypeError(
            f"build_head({name!r}) got unexpected keyword argument(s) {', '.join(unexpected)}; "
            f"{name!r} accepts: {', '.join(accepted)}."
        )
    return HEADS[name](in_features, num_classes, **kwargs)
