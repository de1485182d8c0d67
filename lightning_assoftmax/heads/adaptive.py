r"""``AdaptiveSoftmaxHead``: adaptive softmax (Grave et al., ICML 2017, arXiv 1609.04309).

The frequent classes (the *shortlist*) sit in the head softmax next to one entry per tail cluster;
tail cluster :math:`i` projects the hidden state to ``in_features // div_value ** (i + 1)``
dimensions before its own softmax, so rare classes cost little. Same parameters, names and
results as ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (its ``state_dict`` loads as is), plus
``ignore_index``, ``reduction``, half-precision inputs, the exact AS-Softmax loss and
``class_counts`` to order arbitrary class ids by frequency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_assoftmax.functional._checks import check_real
from lightning_assoftmax.heads._structure import check_class_counts, frequency_order
from lightning_assoftmax.heads.two_level import TwoLevelHead

__all__ = ["AdaptiveSoftmaxHead", "default_cutoffs"]


def default_cutoffs(num_classes: int) -> list[int]:
    """``[V // 16, V // 4]`` (e.g. ``[1907, 7630]`` for 30522 classes): a shortlist of about 6%
    of the classes, which covers most tokens of a Zipf-distributed text, and two tail clusters."""
    cutoffs = sorted({c for c in (num_classes // 16, num_classes // 4) if 0 < c < num_classes})
    return cutoffs or [max(1, num_classes // 2)]


def check_cutoffs(cutoffs: Any, num_classes: int, owner: str) -> list[int]:
    if isinstance(cutoffs, (str, bytes)) or not isinstance(cutoffs, Sequence):
        raise TypeError(
            f"{owner}: cutoffs must be a list of increasing class counts, e.g. [2000, 10000], got {cutoffs!r}."
        )
    values = list(cutoffs)
    if not values:
        raise ValueError(f"{owner}: cutoffs must hold at least one value, e.g. [{max(1, num_classes // 16)}].")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}: cutoffs must be integers, got {value!r} in {values}.")
    if values != sorted(set(values)):
        raise ValueError(
            f"{owner}: cutoffs must be strictly increasing (no repeats), got {values}; "
            f"e.g. {sorted(set(values))}."
        )
    if values[0] < 1 or values[-1] > num_classes - 1:
        raise ValueError(
            f"{owner}: cutoffs must lie in [1, num_classes - 1] = [1, {num_classes - 1}], got {values}: "
            "the first is the shortlist size, each next one ends a tail cluster."
        )
    return values


class AdaptiveSoftmaxHead(TwoLevelHead):
    r"""Adaptive softmax output layer.

    Classes ``0 .. cutoffs[0] - 1`` (in frequency order) are the shortlist; tail cluster ``i``
    holds ranks ``cutoffs[i] .. cutoffs[i + 1] - 1`` (the last one ends at ``num_classes``). As in
    torch, class ids are taken to be sorted by decreasing frequency; give ``class_counts`` to
    have the head rank arbitrary class ids (e.g. WordPiece ids) itself.

    Args:
        in_features: width of the hidden states.
        num_classes: number of classes ``V``.
        cutoffs: increasing ranks in ``[1, V - 1]``; default :func:`default_cutoffs`.
        div_value: each tail cluster's projection is ``div_value`` times narrower than the
            previous one's (first: ``in_features // div_value``).
        head_bias: a bias in the head softmax (torch's default: none).
        class_counts: ``(V,)`` training counts of each class; fix the frequency order.

    Example:
        >>> import torch
        >>> head = AdaptiveSoftmaxHead(16, 100, cutoffs=[10, 40])
        >>> hidden, target = torch.randn(8, 16), torch.randint(0, 100, (8,))
        >>> head.loss(hidden, target, delta=0.1).shape, head.log_prob(hidden).exp().sum(-1).shape
        (torch.Size([]), torch.Size([8]))
    """

    name = "adaptive"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        cutoffs: Sequence[int] | None = None,
        div_value: float = 4.0,
        head_bias: bool = False,
        class_counts: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(in_features, num_classes)
        owner = type(self).__name__
        if num_classes < 2:
            raise ValueError(f"{owner}: needs at least 2 classes (a shortlist and a tail), got {num_classes}.")
        cutoffs = check_cutoffs(default_cutoffs(num_classes) if cutoffs is None else cutoffs, num_classes, owner)
        self.div_value = check_real(div_value, f"{owner}: div_value", low=0.0)
        self.head_bias = bool(head_bias)
        counts = check_class_counts(class_counts, num_classes, owner)
        self.cutoffs = cutoffs + [num_classes]  # torch's attribute: the cutoffs and V
        self.shortlist_size = cutoffs[0]
        self.n_clusters = len(cutoffs)
        self.head = nn.Linear(in_features, self.shortlist_size + self.n_clusters, bias=self.head_bias)
        self.tail = nn.ModuleList()
        for i in range(self.n_clusters):
            width = int(in_features // (self.div_value ** (i + 1)))
            if width < 1:
                raise ValueError(
                    f"{owner}: tail cluster {i} would project {in_features} features to "
                    f"{in_features} // {self.div_value} ** {i + 1} = {width}; lower div_value or use fewer cutoffs."
                )
            size = self.cutoffs[i + 1] - self.cutoffs[i]
            self.tail.append(nn.Sequential(nn.Linear(in_features, width, bias=False), nn.Linear(width, size, bias=False)))
        self._init_layout(frequency_order(counts, num_classes), self.shortlist_size, self.cutoffs)

    def top_scores(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    def cluster_scores(self, cluster: int, hidden: Tensor) -> Tensor:
        return self.tail[cluster](hidden)

    def unused_parameters(self, scored: set[int]) -> list[nn.Parameter]:
        return [p for k in range(self.n_clusters) if k not in scored for p in self.tail[k].parameters()]

    def extra_repr(self) -> str:
        ordered = ", by class_counts" if self.permuted else ""
        return (
            f"{super().extra_repr()}, cutoffs={self.cutoffs[:-1]}, div_value={self.div_value}, "
            f"head_bias={self.head_bias}{ordered}"
        )
