r"""``TwoLevelHead``: a softmax over direct classes and clusters, then a softmax within each cluster.

The shared machinery of :class:`~lightning_assoftmax.heads.AdaptiveSoftmaxHead` (direct classes:
the frequent shortlist) and :class:`~lightning_assoftmax.heads.ClassBasedSoftmaxHead` (no direct
class). With top-level log-probabilities :math:`\log P(\cdot \mid h)` over the ``S`` direct classes
and ``K`` clusters, and :math:`q(i \mid c, h)` the softmax within cluster :math:`c`,

.. math:: \log p(i \mid h) = \log P(i \mid h) \ \text{(direct)}, \qquad
          \log p(i \mid h) = \log P(c \mid h) + \log q(i \mid c, h) \ \text{(} i \in c \text{)} .

Training computes a cluster's scores only for the rows whose target lies in it. The exact
AS-Softmax loss needs, besides, the clusters with :math:`P(c \mid h) \ge p_t - \delta` of the rows
where that cut-off is positive (see :mod:`lightning_assoftmax.heads._as_softmax`).

Classes are stored in *slots*: slots ``[0, S)`` are the direct classes and cluster ``k`` holds slots
``[bounds[k], bounds[k + 1])``; ``class_of_slot`` / ``slot_of_class`` map between the two orders.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.heads._as_softmax import (
    as_loss,
    group_may_hold_kept,
    is_kept,
    keep_threshold,
)
from lightning_assoftmax.heads.base import OutputHead, compute_dtype, graph_anchor

__all__ = ["TwoLevelHead"]


class TwoLevelHead(OutputHead):
    """Base of the two-level heads; subclasses provide :meth:`top_scores` and :meth:`cluster_scores`."""

    def _init_layout(self, class_of_slot: Tensor, num_direct: int, bounds: list[int]) -> None:
        self.num_direct = num_direct
        self.cluster_bounds = list(bounds)  # [S, ..., V]: cluster k holds slots bounds[k]:bounds[k+1]
        self.num_clusters = len(bounds) - 1
        self.permuted = not torch.equal(class_of_slot, torch.arange(self.num_classes))
        # Derived from the constructor's arguments: not saved with the weights.
        self.register_buffer("class_of_slot", class_of_slot.long(), persistent=False)
        self.register_buffer("slot_of_class", torch.argsort(class_of_slot), persistent=False)
        self.register_buffer("_bounds", torch.tensor(bounds, dtype=torch.long), persistent=False)

    # -- subclass hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def top_scores(self, hidden: Tensor) -> Tensor:
        """Scores ``(M, S + K)`` of the direct classes, then of the clusters."""

    @abc.abstractmethod
    def cluster_scores(self, cluster: int, hidden: Tensor) -> Tensor:
        """Scores ``(m, size)`` of the classes of ``cluster`` (in slot order) for rows ``hidden``."""

    def cluster_scorer(self) -> Callable[[int, Tensor], Tensor]:
        """:meth:`cluster_scores` for one pass over the clusters (a subclass may prepare its
        weights once per pass here)."""
        return self.cluster_scores

    def unused_parameters(self, scored: set[int]) -> list[nn.Parameter]:
        """Parameters that no cluster in ``scored`` used: they get a zero gradient, since
        distributed data parallel expects a gradient for every parameter in every step."""
        return []

    # -- the loss ------------------------------------------------------------------------------
    def _slots(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """Slot ``(M,)`` of each target and its cluster (``-1`` for a direct class)."""
        slot = self.slot_of_class[target] if self.permuted else target
        cluster = torch.bucketize(slot, self._bounds, right=True) - 1  # -1 below bounds[0] = S
        return slot, cluster

    def _within(self, scorer: Callable[[int, Tensor], Tensor], cluster: int, hidden: Tensor, cdtype: torch.dtype) -> Tensor:
        """Within-cluster log-softmax ``(m, size)``; a one-class cluster's is 0 and needs no scores."""
        if self.cluster_bounds[cluster + 1] - self.cluster_bounds[cluster] == 1:
            return torch.zeros(hidden.shape[0], 1, dtype=cdtype, device=hidden.device)
        return F.log_softmax(scorer(cluster, hidden), dim=1, dtype=cdtype)

    def row_losses(self, hidden: Tensor, target: Tensor, delta: float | None) -> Tensor:
        return self.row_losses_and_masked(hidden, target, delta)[0]

    def row_losses_and_masked(self, hidden: Tensor, target: Tensor, delta: float | None) -> tuple[Tensor, Tensor]:
        cdtype = compute_dtype(hidden.dtype)
        S = self.num_direct
        slot, cluster = self._slots(target)
        scorer = self.cluster_scorer()
        top = F.log_softmax(self.top_scores(hidden), dim=1, dtype=cdtype)
        log_p = top.gather(1, torch.where(cluster >= 0, S + cluster, slot).unsqueeze(1)).squeeze(1)

        # The within-cluster log-probability of each target, cluster by cluster. One gather puts
        # the rows in cluster order and each cluster takes a view: the backward then writes the
        # hidden states' gradient once (an index per cluster would write a full-size one each).
        order = torch.argsort(cluster, stable=True)
        sizes = torch.bincount(cluster + 1, minlength=self.num_clusters + 1).tolist()
        sorted_hidden = hidden[order].split(sizes)
        sorted_rows = order.split(sizes)
        blocks: dict[int, tuple[Tensor, Tensor]] = {}  # cluster -> (rows, within-cluster log-softmax)
        parts = [top.new_zeros(sizes[0])]  # a direct class has nothing within
        for k in range(self.num_clusters):
            rows = sorted_rows[k + 1]
            if rows.numel() == 0:
                continue
            within = self._within(scorer, k, sorted_hidden[k + 1], cdtype)
            blocks[k] = (rows, within)
            offset = (slot[rows] - self.cluster_bounds[k]).unsqueeze(1)
            parts.append(within.gather(1, offset).squeeze(1))
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        log_p = log_p + torch.cat(parts)[inverse]

        computed = set(blocks)
        if delta is None:
            losses, masked = -log_p, torch.zeros(log_p.shape, dtype=torch.bool, device=log_p.device)
        else:
            losses, masked = self._as_losses(scorer, hidden, top, log_p, slot, cluster, blocks, delta, computed)
        bounds = self.cluster_bounds
        unused = self.unused_parameters({k for k in computed if bounds[k + 1] - bounds[k] > 1})
        if unused:
            losses = losses + graph_anchor(unused, losses)
        return losses, masked

    def _as_losses(
        self,
        scorer: Callable[[int, Tensor], Tensor],
        hidden: Tensor,
        top: Tensor,
        log_p: Tensor,
        slot: Tensor,
        cluster: Tensor,
        blocks: dict[int, tuple[Tensor, Tensor]],
        delta: float,
        computed: set[int],
    ) -> tuple[Tensor, Tensor]:
        """Exact AS-Softmax losses and masked flags ``(M,)``: the kept mass of rows whose cut-off
        is positive."""
        S = self.num_direct
        threshold = keep_threshold(log_p, delta)
        can_mask = threshold > 0
        if not bool(can_mask.any()):
            return -log_p, torch.zeros(log_p.shape, dtype=torch.bool, device=log_p.device)
        mass = torch.zeros_like(log_p)
        count = torch.zeros_like(slot)

        def add(rows: Tensor, log_p_block: Tensor, target_column: Tensor | None) -> None:
            nonlocal mass, count
            keep = is_kept(log_p_block, threshold[rows].unsqueeze(1))
            if target_column is not None:  # the target is always kept, whatever the rounding
                keep = keep | (torch.arange(keep.shape[1], device=keep.device) == target_column.unsqueeze(1))
            kept_p = torch.where(keep, log_p_block.exp(), torch.zeros_like(log_p_block))
            mass = mass.index_add(0, rows, kept_p.sum(dim=1))
            count = count.index_add(0, rows, keep.sum(dim=1))

        masking_rows = can_mask.nonzero().squeeze(1)
        if S:
            direct_target = torch.where(cluster[masking_rows] < 0, slot[masking_rows], -1)
            add(masking_rows, top[masking_rows, :S], direct_target)
        # The targets' own clusters, from the blocks computed for the targets.
        for k, (rows, within) in blocks.items():
            mine = can_mask[rows]
            if not bool(mine.any()):
                continue
            rows = rows[mine]
            block = top[rows, S + k].unsqueeze(1) + within[mine]
            add(rows, block, slot[rows] - self.cluster_bounds[k])
        # Other clusters that may hold a kept class.
        others = group_may_hold_kept(top[masking_rows, S:], threshold[masking_rows].unsqueeze(1))
        others &= torch.arange(self.num_clusters, device=others.device) != cluster[masking_rows].unsqueeze(1)
        pairs = others.nonzero()
        if pairs.numel():
            order = torch.argsort(pairs[:, 1], stable=True)
            pair_rows, pair_clusters = masking_rows[pairs[order, 0]], pairs[order, 1]
            sizes = torch.bincount(pair_clusters, minlength=self.num_clusters).tolist()
            pair_hidden = hidden[pair_rows].split(sizes)
            for k, rows in enumerate(pair_rows.split(sizes)):
                if rows.numel() == 0:
                    continue
                computed.add(k)
                within = self._within(scorer, k, pair_hidden[k], top.dtype)
                add(rows, top[rows, S + k].unsqueeze(1) + within, None)
        return as_loss(log_p, mass, count, threshold)

    # -- evaluation ----------------------------------------------------------------------------
    def log_prob_rows(self, hidden: Tensor) -> Tensor:
        cdtype = compute_dtype(hidden.dtype)
        S = self.num_direct
        scorer = self.cluster_scorer()
        top = F.log_softmax(self.top_scores(hidden), dim=1, dtype=cdtype)
        parts = [top[:, :S]]
        for k in range(self.num_clusters):
            parts.append(top[:, S + k].unsqueeze(1) + self._within(scorer, k, hidden, cdtype))
        by_slot = torch.cat(parts, dim=1)
        return by_slot.index_select(1, self.slot_of_class) if self.permuted else by_slot

    def predict_rows(self, hidden: Tensor) -> Tensor:
        """Exact argmax without all ``V`` scores: a cluster can beat the best class found so far
        only if its own probability is higher, so only such clusters are scored (the most probable
        cluster first, which gives a good bound)."""
        cdtype = compute_dtype(hidden.dtype)
        S, K = self.num_direct, self.num_clusters
        scorer = self.cluster_scorer()
        top = F.log_softmax(self.top_scores(hidden), dim=1, dtype=cdtype)
        if S:
            best_lp, best_slot = top[:, :S].max(dim=1)
        else:
            best_lp = torch.full_like(top[:, 0], -torch.inf)
            best_slot = torch.zeros_like(top[:, 0], dtype=torch.long)
        first = top[:, S:].argmax(dim=1)

        def visit(k: int, rows: Tensor) -> None:
            rows = rows[top[rows, S + k] > best_lp[rows]]
            if rows.numel() == 0:
                return
            within_lp, within_best = self._within(scorer, k, hidden[rows], cdtype).max(dim=1)
            candidate = top[rows, S + k] + within_lp
            better = candidate > best_lp[rows]
            best_lp[rows[better]] = candidate[better]
            best_slot[rows[better]] = self.cluster_bounds[k] + within_best[better]

        all_rows = torch.arange(hidden.shape[0], device=hidden.device)
        for k in range(K):
            visit(k, all_rows[first == k])
        for k in range(K):
            visit(k, all_rows[first != k])
        return self.class_of_slot[best_slot] if self.permuted else best_slot
