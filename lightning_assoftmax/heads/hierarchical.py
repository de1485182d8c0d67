r"""``HierarchicalSoftmaxHead``: binary hierarchical softmax (Morin & Bengio, AISTATS 2005) over a
Huffman tree (Mikolov et al., 2013, word2vec).

Each class is a leaf of a binary tree with ``V - 1`` internal nodes; node :math:`n` has a weight
vector :math:`w_n` and bias :math:`b_n`, and sends a hidden state left with probability
:math:`\sigma(w_n \cdot h + b_n)`. A class's probability is the product along its path:

.. math:: \log p(i \mid h) = \sum_{(n, s) \in \mathrm{path}(i)} \log \sigma\big(s\,(w_n \cdot h + b_n)\big),
          \qquad s = +1 \text{ (left)}, -1 \text{ (right)},

so a training row costs its path length (about the entropy of the class distribution in bits for
a Huffman tree) instead of ``V`` scores. A subtree's probability bounds each of its leaves', so the
exact AS-Softmax loss walks down from the root through the subtrees with
:math:`P(n) \ge p_t - \delta` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.heads._as_softmax import (
    as_loss,
    group_may_hold_kept,
    is_kept,
    keep_threshold,
)
from lightning_assoftmax.heads._structure import (
    BinaryTree,
    check_class_counts,
    expected_path_length,
    huffman_tree,
    nested_tree,
)
from lightning_assoftmax.heads.base import OutputHead, compute_dtype

__all__ = ["HierarchicalSoftmaxHead"]


class HierarchicalSoftmaxHead(OutputHead):
    """Binary hierarchical softmax output layer.

    Args:
        in_features: width of the hidden states.
        num_classes: number of classes ``V`` (at least 2).
        class_counts: ``(V,)`` training counts; the tree is their Huffman tree (balanced without).
        tree: instead, the tree as nested pairs of class ids, e.g. ``[[0, 1], [2, [3, 4]]]``.
        bias: a bias per internal node.

    Attributes:
        tree: the :class:`~lightning_assoftmax.heads._structure.BinaryTree` (nodes breadth first).
        mean_path_length: path length averaged over ``class_counts`` (uniform without).

    Example:
        >>> import torch
        >>> head = HierarchicalSoftmaxHead(16, 5, tree=[[0, 1], [2, [3, 4]]])
        >>> head.tree.path_nodes[4], head.tree.path_signs[4]
        ([0, 2, 3], [-1.0, -1.0, -1.0])
        >>> torch.allclose(head.log_prob(torch.randn(2, 16)).exp().sum(-1), torch.ones(2))
        True
    """

    name = "hierarchical"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        class_counts: Sequence[float] | Tensor | None = None,
        tree: Any = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, num_classes)
        owner = type(self).__name__
        if num_classes < 2:
            raise ValueError(f"{owner}: needs at least 2 classes for a binary tree, got {num_classes}.")
        counts = check_class_counts(class_counts, num_classes, owner)
        if tree is not None and counts is not None:
            raise ValueError(f"{owner}: give class_counts (for a Huffman tree) or tree, not both.")
        self.tree: BinaryTree = nested_tree(tree, num_classes, owner) if tree is not None else huffman_tree(counts, num_classes)
        self.mean_path_length = expected_path_length(self.tree, counts)
        self.bias = bool(bias)
        num_nodes = num_classes - 1
        self.node_weight = nn.Parameter(torch.empty(num_nodes, in_features))
        self.node_bias = nn.Parameter(torch.empty(num_nodes)) if self.bias else None
        self.reset_parameters()

        tree_ = self.tree
        depth = tree_.max_depth
        path_nodes = torch.zeros(num_classes, depth, dtype=torch.long)
        path_signs = torch.zeros(num_classes, depth)
        for cls, (nodes, signs) in enumerate(zip(tree_.path_nodes, tree_.path_signs, strict=True)):
            path_nodes[cls, : len(nodes)] = torch.tensor(nodes)
            path_signs[cls, : len(signs)] = torch.tensor(signs)
        # The tree is rebuilt from the constructor's arguments: not saved with the weights.
        buffers = {
            "path_nodes": path_nodes,
            "path_signs": path_signs,
            "path_length": torch.tensor([len(p) for p in tree_.path_nodes]),
            "node_children": torch.tensor(tree_.children, dtype=torch.long).reshape(num_nodes, 2),
            "node_parent": torch.tensor(tree_.parent, dtype=torch.long).clamp(min=0),
            "node_sign": torch.tensor(tree_.sign),
            "leaf_parent": torch.tensor(tree_.leaf_parent, dtype=torch.long),
            "leaf_sign": torch.tensor(tree_.leaf_sign),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def reset_parameters(self) -> None:
        """Uniform in ``+-1/sqrt(in_features)``, as ``nn.Linear``."""
        bound = 1.0 / math.sqrt(self.in_features)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def _node_scores(self, hidden: Tensor, nodes: Tensor) -> Tensor:
        """Scores ``(P,)`` ``w_n . h + b_n`` of node ``nodes[p]`` for row ``hidden[p]``."""
        scores = (F.embedding(nodes, self.node_weight) * hidden).sum(dim=-1)
        return scores + self.node_bias[nodes] if self.node_bias is not None else scores

    def path_log_prob(self, hidden: Tensor, classes: Tensor) -> Tensor:
        """``log p(classes[m] | hidden[m])`` ``(M,)`` along each class's path."""
        cdtype = compute_dtype(hidden.dtype)
        depth = int(self.path_length[classes].max())
        nodes = self.path_nodes[classes, :depth]
        signs = self.path_signs[classes, :depth].to(cdtype)
        scores = torch.bmm(F.embedding(nodes, self.node_weight), hidden.unsqueeze(2)).squeeze(2)
        if self.node_bias is not None:
            scores = scores + self.node_bias[nodes]
        steps = F.logsigmoid(signs * scores.to(cdtype))
        return torch.where(signs != 0, steps, torch.zeros_like(steps)).sum(dim=1)

    def row_losses(self, hidden: Tensor, target: Tensor, delta: float | None) -> Tensor:
        return self.row_losses_and_masked(hidden, target, delta)[0]

    def row_losses_and_masked(self, hidden: Tensor, target: Tensor, delta: float | None) -> tuple[Tensor, Tensor]:
        log_p = self.path_log_prob(hidden, target)
        unmasked = torch.zeros(log_p.shape, dtype=torch.bool, device=log_p.device)
        if delta is None:
            return -log_p, unmasked
        threshold = keep_threshold(log_p, delta)
        can_mask = threshold > 0
        if not bool(can_mask.any()):
            return -log_p, unmasked
        with torch.no_grad():
            rows, classes = self._kept_leaves(hidden, target, threshold, can_mask.nonzero().squeeze(1))
        kept_p = self.path_log_prob(hidden[rows], classes).exp()
        mass = torch.zeros_like(log_p).index_add(0, rows, kept_p)
        count = torch.zeros_like(target).index_add(0, rows, torch.ones_like(rows))
        return as_loss(log_p, mass, count, threshold)

    def _kept_leaves(self, hidden: Tensor, target: Tensor, threshold: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(rows, classes)`` of the kept classes of ``rows``, found walking down from the root
        through the subtrees that may hold one (at most ``1 / tau`` per depth)."""
        cdtype = compute_dtype(hidden.dtype)
        nodes = torch.zeros_like(rows)
        log_p = torch.zeros(rows.shape[0], dtype=cdtype, device=hidden.device)
        kept_rows, kept_classes = [], []
        while rows.numel():
            scores = self._node_scores(hidden[rows], nodes).to(cdtype)
            next_rows, next_nodes, next_log_p = [], [], []
            for side, sign in ((0, 1.0), (1, -1.0)):
                child = self.node_children[nodes, side]
                child_log_p = log_p + F.logsigmoid(sign * scores)
                leaf = child < 0
                # The target is always kept, whatever the rounding of its path.
                keep = leaf & (is_kept(child_log_p, threshold[rows]) | (-child - 1 == target[rows]))
                kept_rows.append(rows[keep])
                kept_classes.append(-child[keep] - 1)
                descend = ~leaf & group_may_hold_kept(child_log_p, threshold[rows])
                next_rows.append(rows[descend])
                next_nodes.append(child[descend])
                next_log_p.append(child_log_p[descend])
            rows, nodes, log_p = torch.cat(next_rows), torch.cat(next_nodes), torch.cat(next_log_p)
        return torch.cat(kept_rows), torch.cat(kept_classes)

    def log_prob_rows(self, hidden: Tensor) -> Tensor:
        cdtype = compute_dtype(hidden.dtype)
        scores = F.linear(hidden, self.node_weight, self.node_bias).to(cdtype)  # (M, V - 1)
        # Log-probability of reaching each internal node, depth by depth (breadth-first numbering
        # puts a depth's nodes, and hence its parents, in contiguous ranges).
        edges = F.logsigmoid(scores.index_select(1, self.node_parent) * self.node_sign.to(cdtype))
        bounds = self.tree.level_bounds
        levels = [torch.zeros_like(scores[:, :1])]
        for d in range(1, len(bounds) - 1):
            start, end = bounds[d], bounds[d + 1]
            parents = self.node_parent[start:end] - bounds[d - 1]
            levels.append(levels[-1].index_select(1, parents) + edges[:, start:end])
        node_log_p = torch.cat(levels, dim=1)
        leaf_edges = F.logsigmoid(scores.index_select(1, self.leaf_parent) * self.leaf_sign.to(cdtype))
        return node_log_p.index_select(1, self.leaf_parent) + leaf_edges

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, bias={self.bias}, max_depth={self.tree.max_depth}, "
            f"mean_path_length={self.mean_path_length:.2f}"
        )
