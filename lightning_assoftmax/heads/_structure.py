"""Class statistics and output structures: frequency order, frequency bins and binary trees.

Plain Python/PyTorch on small tensors, run once when a head is built (never per batch).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BinaryTree",
    "check_class_counts",
    "check_cluster_of",
    "frequency_bins",
    "frequency_order",
    "huffman_tree",
    "nested_tree",
]


def check_class_counts(class_counts: Any, num_classes: int, owner: str) -> Tensor | None:
    """``class_counts`` as a float64 ``(num_classes,)`` tensor of finite counts >= 0, or ``None``."""
    if class_counts is None:
        return None
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{owner}: class_counts must be a sequence of {num_classes} numbers (how often each class "
            f"occurs in the training targets), got {type(class_counts).__name__}: {error}"
        ) from None
    if counts.dim() != 1 or counts.numel() != num_classes:
        raise ValueError(
            f"{owner}: class_counts must hold one count per class, {num_classes} in all, got shape "
            f"{tuple(counts.shape)}; count the training targets with "
            f"torch.bincount(targets, minlength={num_classes})."
        )
    bad = ~torch.isfinite(counts) | (counts < 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{owner}: class_counts must be finite and >= 0, got {counts[index].item()!r} for class {index}."
        )
    return counts


def frequency_order(counts: Tensor | None, num_classes: int) -> Tensor:
    """Class ids from the most to the least frequent (ties by class id); ids in order without counts."""
    if counts is None:
        return torch.arange(num_classes)
    return torch.sort(-counts, stable=True).indices


def frequency_bins(counts: Tensor | None, num_classes: int, num_clusters: int) -> Tensor:
    """Cluster id ``(V,)`` of each class: classes by decreasing frequency cut into ``num_clusters``
    runs of about equal probability mass (Goodman 2001; Mikolov et al. 2011), none empty.

    Frequent classes get small clusters and rare ones large clusters, so the expected size of the
    target's cluster is about ``V / num_clusters``. Without counts the runs are of equal size.
    """
    if counts is None or float(counts.sum()) <= 0:
        counts = torch.ones(num_classes, dtype=torch.float64)
    order = frequency_order(counts, num_classes)
    mass = counts[order]
    total = float(mass.sum())
    cluster_of = [0] * num_classes
    cluster, cumulative = 0, 0.0
    for position, (cls, weight) in enumerate(zip(order.tolist(), mass.tolist(), strict=True)):
        cluster_of[cls] = cluster
        cumulative += weight
        clusters_left = num_clusters - cluster - 1
        classes_left = num_classes - position - 1
        if clusters_left > 0 and (
            cumulative >= (cluster + 1) * total / num_clusters or classes_left == clusters_left
        ):
            cluster += 1
    return torch.tensor(cluster_of, dtype=torch.long)


def check_cluster_of(cluster_of: Any, num_classes: int, owner: str) -> Tensor:
    """A user's class -> cluster mapping as a ``(V,)`` long tensor with ids ``0..K-1``, all used."""
    try:
        mapping = torch.as_tensor(cluster_of).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{owner}: cluster_of must be a sequence of {num_classes} cluster ids: {error}") from None
    if mapping.dim() != 1 or mapping.numel() != num_classes:
        raise ValueError(
            f"{owner}: cluster_of must give one cluster id per class, {num_classes} in all, got shape "
            f"{tuple(mapping.shape)}."
        )
    if mapping.is_floating_point() or mapping.dtype == torch.bool or mapping.is_complex():
        raise TypeError(f"{owner}: cluster_of must hold integer cluster ids, got dtype {mapping.dtype}.")
    mapping = mapping.long()
    if bool((mapping < 0).any()):
        raise ValueError(f"{owner}: cluster ids must be >= 0, got {int(mapping.min())}.")
    used = torch.bincount(mapping)
    if bool((used == 0).any()):
        empty = int((used == 0).nonzero()[0, 0])
        raise ValueError(
            f"{owner}: cluster_of numbers its clusters 0..{used.numel() - 1} but cluster {empty} has no "
            "class; number the clusters consecutively from 0."
        )
    return mapping


class BinaryTree:
    """A binary tree over ``V`` classes with ``V - 1`` internal nodes numbered breadth-first.

    ``children[n] = (left, right)``; a child ``>= 0`` is an internal node, ``-(c + 1)`` is class
    ``c``. Breadth-first numbering puts each depth's nodes in one contiguous range.
    """

    def __init__(self, children: list[tuple[int, int]], num_classes: int) -> None:
        self.children = children
        self.num_classes = num_classes
        depth = [0] * len(children)
        self.parent = [-1] * len(children)
        self.sign = [0.0] * len(children)  # +1: left child of its parent, -1: right child
        self.leaf_parent = [-1] * num_classes
        self.leaf_sign = [0.0] * num_classes
        self.path_nodes: list[list[int]] = [[] for _ in range(num_classes)]
        self.path_signs: list[list[float]] = [[] for _ in range(num_classes)]
        paths: list[tuple[list[int], list[float]]] = [([], [])] * len(children)
        for node, pair in enumerate(children):
            nodes, signs = paths[node]
            for child, sign in zip(pair, (1.0, -1.0), strict=True):
                if child >= 0:
                    depth[child] = depth[node] + 1
                    self.parent[child], self.sign[child] = node, sign
                    paths[child] = (nodes + [node], signs + [sign])
                else:
                    cls = -child - 1
                    self.leaf_parent[cls], self.leaf_sign[cls] = node, sign
                    self.path_nodes[cls] = nodes + [node]
                    self.path_signs[cls] = signs + [sign]
        # Depth ranges [start, end) of the breadth-first numbering.
        self.level_bounds = [0] + [i for i in range(1, len(depth)) if depth[i] != depth[i - 1]] + [len(depth)]
        self.max_depth = max(len(p) for p in self.path_nodes)


def _breadth_first(root: Any, child_pairs: dict[Any, tuple[Any, Any]], num_classes: int) -> BinaryTree:
    """Number the internal nodes of a tree given as ``{node: (left, right)}`` breadth first."""
    order, queue = [], [root]
    while queue:
        node = queue.pop(0)
        order.append(node)
        queue.extend(child for child in child_pairs[node] if child in child_pairs)
    number = {node: i for i, node in enumerate(order)}
    children = []
    for node in order:
        pair = tuple(number[c] if c in child_pairs else -(c[1] + 1) for c in child_pairs[node])
        children.append(pair)
    return BinaryTree(children, num_classes)


def huffman_tree(counts: Tensor | None, num_classes: int) -> BinaryTree:
    """The Huffman tree of the class counts (word2vec's tree; a balanced one without counts).

    Frequent classes get short paths: the expected path length is within one node of the entropy
    of the class distribution in bits. Ties merge in first-in-first-out order, so classes of equal
    count (e.g. the never-seen ones) form balanced subtrees rather than a chain.
    """
    weights = counts.tolist() if counts is not None else [1.0] * num_classes
    tie = itertools.count()
    heap = [(w, next(tie), ("leaf", c)) for c, w in enumerate(weights)]
    heapq.heapify(heap)
    child_pairs: dict[Any, tuple[Any, Any]] = {}
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        node = ("node", len(child_pairs))
        child_pairs[node] = (a, b)
        heapq.heappush(heap, (w1 + w2, next(tie), node))
    return _breadth_first(heap[0][2], child_pairs, num_classes)


def nested_tree(tree: Any, num_classes: int, owner: str) -> BinaryTree:
    """A user's tree given as nested pairs of class ids, e.g. ``[[0, 1], [2, [3, 4]]]``."""
    child_pairs: dict[Any, tuple[Any, Any]] = {}
    seen: list[int] = []

    def visit(item: Any) -> Any:
        if isinstance(item, bool):
            raise TypeError(f"{owner}: tree leaves must be class ids, got {item!r}.")
        if isinstance(item, int):
            if not 0 <= item < num_classes:
                raise ValueError(f"{owner}: tree leaf {item} is not a class id in [0, {num_classes}).")
            seen.append(item)
            return ("leaf", item)
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            node = ("node", len(child_pairs))
            child_pairs[node] = ()  # reserve the number before the children take theirs
            child_pairs[node] = (visit(item[0]), visit(item[1]))
            return node
        raise ValueError(
            f"{owner}: every tree node must be a pair [left, right] of subtrees or class ids, got {item!r}."
        )

    root = visit(tree)
    if root[0] == "leaf":
        raise ValueError(f"{owner}: the tree must have at least one internal node, got the single class {tree!r}.")
    if sorted(seen) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(seen))
        doubled = sorted({c for c in seen if seen.count(c) > 1})
        raise ValueError(
            f"{owner}: the tree must hold every class exactly once; "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, repeated {doubled[:10]}."
        )
    return _breadth_first(root, child_pairs, num_classes)


def expected_path_length(tree: BinaryTree, counts: Tensor | None) -> float:
    """Mean number of nodes on the path to a class, weighted by the counts (uniform without)."""
    lengths = torch.tensor([len(p) for p in tree.path_nodes], dtype=torch.float64)
    if counts is None or float(counts.sum()) <= 0:
        return float(lengths.mean())
    return float((lengths * counts).sum() / counts.sum())


def default_num_clusters(num_classes: int) -> int:
    """About ``sqrt(V)`` clusters: with mass-balanced bins a row then scores about
    ``K + V / K`` classes, least at ``K = sqrt(V)``."""
    return max(1, min(num_classes, round(math.sqrt(num_classes))))
