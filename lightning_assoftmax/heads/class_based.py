r"""``ClassBasedSoftmaxHead``: two-level class-based softmax (Goodman, ICASSP 2001).

Every class belongs to one of ``K`` clusters: :math:`p(i \mid h) = P(c(i) \mid h)\, q(i \mid c(i), h)`,
both factors softmaxes over full-width linear scores. With clusters cut by frequency into runs of
equal probability mass (Mikolov et al., ICASSP 2011), a training row scores about
:math:`K + V / K` classes instead of :math:`V`: fewest at :math:`K \approx \sqrt{V}`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.functional._checks import check_positive_int
from lightning_assoftmax.heads._structure import (
    check_class_counts,
    check_cluster_of,
    default_num_clusters,
    frequency_bins,
    frequency_order,
)
from lightning_assoftmax.heads.two_level import TwoLevelHead

__all__ = ["ClassBasedSoftmaxHead"]


class ClassBasedSoftmaxHead(TwoLevelHead):
    r"""Class-based (two-level) softmax output layer.

    Args:
        in_features: width of the hidden states.
        num_classes: number of classes ``V``.
        num_clusters: ``K``, default ``round(sqrt(V))``; clusters are cut from ``class_counts``
            (equal probability mass per cluster; equal sizes without counts).
        cluster_of: instead, the cluster id of each class (``(V,)``, ids ``0 .. K-1``, all used).
        class_counts: ``(V,)`` training counts of each class.
        bias: biases in both softmaxes.

    The class weights ``class_weight`` ``(V, in_features)`` are stored cluster by cluster: row
    ``slot_of_class[c]`` belongs to class ``c``.

    Example:
        >>> import torch
        >>> head = ClassBasedSoftmaxHead(16, 100, class_counts=torch.arange(100, 0, -1))
        >>> head.num_clusters
        10
        >>> torch.allclose(head.log_prob(torch.randn(3, 16)).exp().sum(-1), torch.ones(3))
        True
    """

    name = "class_based"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_clusters: int | None = None,
        cluster_of: Sequence[int] | Tensor | None = None,
        class_counts: Sequence[float] | Tensor | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, num_classes)
        owner = type(self).__name__
        counts = check_class_counts(class_counts, num_classes, owner)
        if cluster_of is not None:
            mapping = check_cluster_of(cluster_of, num_classes, owner)
            given = int(mapping.max()) + 1
            if num_clusters is not None and num_clusters != given:
                raise ValueError(
                    f"{owner}: num_clusters={num_clusters!r} disagrees with cluster_of, which uses {given} "
                    "clusters; give one of the two."
                )
        else:
            k = default_num_clusters(num_classes) if num_clusters is None else num_clusters
            check_positive_int(k, f"{owner}: num_clusters")
            if k > num_classes:
                raise ValueError(f"{owner}: num_clusters={k} exceeds num_classes={num_classes}; use at most that many.")
            mapping = frequency_bins(counts, num_classes, k)
        self.bias = bool(bias)
        num_clusters = int(mapping.max()) + 1
        by_frequency = frequency_order(counts, num_classes)
        class_of_slot = by_frequency[torch.argsort(mapping[by_frequency], stable=True)]
        sizes = torch.bincount(mapping, minlength=num_clusters)
        bounds = [0] + torch.cumsum(sizes, 0).tolist()
        self.cluster_weight = nn.Parameter(torch.empty(num_clusters, in_features))
        self.class_weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.cluster_bias = nn.Parameter(torch.empty(num_clusters)) if self.bias else None
        self.class_bias = nn.Parameter(torch.empty(num_classes)) if self.bias else None
        self._init_layout(class_of_slot, 0, bounds)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation: uniform in ``+-1/sqrt(in_features)``."""
        bound = 1.0 / math.sqrt(self.in_features)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    @property
    def cluster_of(self) -> Tensor:
        """Cluster id ``(V,)`` of each class."""
        slot_cluster = torch.bucketize(torch.arange(self.num_classes, device=self._bounds.device), self._bounds, right=True) - 1
        return slot_cluster[self.slot_of_class]

    def top_scores(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.cluster_weight, self.cluster_bias)

    def cluster_scores(self, cluster: int, hidden: Tensor) -> Tensor:
        start, end = self.cluster_bounds[cluster], self.cluster_bounds[cluster + 1]
        bias = self.class_bias[start:end] if self.class_bias is not None else None
        return F.linear(hidden, self.class_weight[start:end], bias)

    def unused_parameters(self, scored: set[int]) -> list[nn.Parameter]:
        # All clusters share the class weights: unused only when no cluster was scored (every
        # target in a one-class cluster, whose within-cluster probability is 1).
        if scored:
            return []
        return [p for p in (self.class_weight, self.class_bias) if p is not None]

    def cluster_scorer(self) -> Callable[[int, Tensor], Tensor]:
        # One split per pass: its backward writes the class weights' gradient once, where a
        # slice per cluster would materialise a full-size gradient for each cluster.
        sizes = [end - start for start, end in itertools.pairwise(self.cluster_bounds)]
        weights = self.class_weight.split(sizes)
        biases = self.class_bias.split(sizes) if self.class_bias is not None else [None] * len(sizes)

        def scores(cluster: int, hidden: Tensor) -> Tensor:
            return F.linear(hidden, weights[cluster], biases[cluster])

        return scores

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_clusters={self.num_clusters}, bias={self.bias}"

