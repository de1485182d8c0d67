r"""The rest schedule of ``SkipMaskedSamples``: which training samples sit out an epoch.

A sample whose AS-Softmax loss is exactly zero (a *masked sample*) contributes an exactly zero
gradient. After its :math:`s`-th consecutive masked visit a sample *rests*, i.e. is left out of
the training batches, for

.. math:: r(s) = \min(2^{s-1}, r_{\max}) \ \text{epochs},

and is then visited again: an unmasked visit makes it live in every epoch again (:math:`s = 0`),
a masked one rests it for longer. A resting sample is therefore re-checked at most
:math:`r_{\max}` epochs after its last (masked) visit.

Everything here is pure PyTorch on CPU tensors indexed by the sample's position in the dataset;
no Lightning import.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["live_samples", "rest_epochs", "shard_indices", "update_rest_schedule"]


def rest_epochs(masked_streak: Tensor, max_rest: int) -> Tensor:
    """Epochs of rest after ``masked_streak`` consecutive masked visits: ``min(2**(s-1), max_rest)``
    for ``s >= 1``, 0 for ``s = 0`` (int64, shaped like ``masked_streak``).

    Example:
        >>> rest_epochs(torch.tensor([0, 1, 2, 3, 4, 9]), max_rest=4).tolist()
        [0, 1, 2, 4, 4, 4]
    """
    streak = masked_streak.to(torch.int64)
    # 2**(s-1) overflows int64 for s > 63; the cap makes larger exponents pointless.
    exponent = (streak - 1).clamp(min=0, max=62)
    rest = torch.minimum(torch.ones_like(exponent) << exponent, torch.full_like(exponent, max_rest))
    return torch.where(streak > 0, rest, torch.zeros_like(rest))


def update_rest_schedule(
    masked_streak: Tensor,
    next_live_epoch: Tensor,
    visits: Tensor,
    masked_visits: Tensor,
    epoch: int,
    max_rest: int,
) -> tuple[Tensor, Tensor]:
    """The schedule after epoch ``epoch``: ``(masked_streak, next_live_epoch)``, both ``(n,)``.

    Args:
        masked_streak: consecutive masked visits of each sample before this epoch, ``(n,)``.
        next_live_epoch: first epoch in which each sample is live again, ``(n,)``.
        visits: how often each sample was in a training batch during ``epoch`` (over all
            processes), ``(n,)``.
        masked_visits: how many of those visits had the sample masked, ``(n,)``.
        epoch: the epoch that just ended.
        max_rest: the longest rest, in epochs (0: nothing ever rests).

    A visited sample counts as masked when it was masked at every visit of the epoch (a sample
    drawn twice, e.g. as DDP padding, rests only if both visits found it masked). Samples not
    visited keep their state.
    """
    visited = visits > 0
    all_masked = visited & (masked_visits == visits)
    streak = torch.where(all_masked, masked_streak + 1, torch.where(visited, torch.zeros_like(masked_streak), masked_streak))
    rest = rest_epochs(streak, max_rest) if max_rest > 0 else torch.zeros_like(streak, dtype=torch.int64)
    after = torch.where(all_masked, epoch + 1 + rest, torch.full_like(rest, epoch + 1))
    return streak, torch.where(visited, after.to(next_live_epoch.dtype), next_live_epoch)


def live_samples(
    next_live_epoch: Tensor,
    epoch: int,
    *,
    population: Tensor | None = None,
    min_live: int = 0,
    tie_break: Tensor | None = None,
) -> Tensor:
    """Which samples are live (not resting) in ``epoch``: a bool ``(n,)`` mask.

    A sample is live when ``next_live_epoch <= epoch`` and it belongs to ``population`` (bool
    ``(n,)``; default: every sample). If fewer than ``min_live`` samples are live, the resting
    samples due soonest are woken early until ``min_live`` are (ties broken by ascending
    ``tie_break``, default: by index), so that an epoch in which every sample would rest still
    has batches to run; no sample ever rests longer than scheduled.
    """
    live = next_live_epoch <= epoch
    if population is not None:
        live &= population
    missing = min_live - int(live.sum())
    if missing <= 0:
        return live
    resting = ~live if population is None else ~live & population
    candidates = torch.nonzero(resting).flatten()
    if candidates.numel() == 0:
        return live
    keys = next_live_epoch[candidates].to(torch.int64)
    order = torch.arange(candidates.numel()) if tie_break is None else torch.argsort(tie_break[candidates], stable=True)
    # Sort by the tie-break first, then stably by due epoch: due epoch decides, tie-break orders ties.
    by_tie = candidates[order]
    by_due = by_tie[torch.argsort(keys[order], stable=True)]
    live = live.clone()
    live[by_due[:missing]] = True
    return live


def shard_indices(order: Tensor, num_replicas: int, rank: int, drop_last: bool) -> Tensor:
    """This process's share of ``order`` as ``torch.utils.data.DistributedSampler`` deals it.

    Without ``drop_last`` the order is padded with its own first elements to a multiple of
    ``num_replicas``; with it, the tail that does not fill a round is dropped. Then every
    ``num_replicas``-th element from ``rank`` on. Every process gets the same number of indices.
    """
    n = order.numel()
    if num_replicas == 1:
        return order
    if drop_last:
        total = (n // num_replicas) * num_replicas
        order = order[:total]
    else:
        total = math.ceil(n / num_replicas) * num_replicas
        padding = total - n
        if padding and n:
            repeats = math.ceil(padding / n)
            order = torch.cat([order, order.repeat(repeats)[:padding]])
    return order[rank:total:num_replicas]
