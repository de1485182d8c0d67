r"""AS-Softmax's keep rule on the probabilities a structured output layer computes.

Class :math:`i` is kept iff :math:`p_i \ge \tau` with :math:`\tau = p_t - \delta` (the cut-off of
:func:`lightning_assoftmax.ops.as_softmax_keep_threshold`, the one the dense loss and
``as_softmax_keep_mask`` use), and the loss is :math:`\log \sum_{i\ \mathrm{kept}} p_i - \log p_t`.

A class's probability never exceeds the probability of a cluster or subtree that holds it, so a
group with :math:`P(g) < \tau` holds no kept class and its scores are never needed; probabilities of
disjoint groups sum to at most 1, so at most :math:`1 / \tau` groups per level survive. Where
:math:`\tau \le 0` nothing is masked and the loss is :math:`-\log p_t`: the common case, computed
from the target's path alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_assoftmax.ops import as_softmax_keep_threshold

__all__ = ["GROUP_SLACK", "as_loss", "group_may_hold_kept", "is_kept", "keep_threshold"]

#: Relative margin on a group's probability before it is pruned: a group's and its members'
#: probabilities are computed along different paths, so rounding must never prune a group that
#: holds a class at the cut-off. Members of a kept group are then decided one by one, exactly.
GROUP_SLACK = 1e-4


def keep_threshold(log_p_target: Tensor, delta: float) -> Tensor:
    """The cut-off :math:`\\tau = p_t - \\delta` of each row, from ``log p_t`` (no gradient)."""
    return as_softmax_keep_threshold(log_p_target.detach().exp(), delta)


def is_kept(log_p: Tensor, threshold: Tensor) -> Tensor:
    """Whether classes of log-probability ``log_p`` are kept: ``p >= tau``, written ``~(p < tau)``
    as in ``as_softmax_keep_mask`` so that NaN keeps everything (nothing is hidden)."""
    return ~(log_p.detach().exp() < threshold)


def group_may_hold_kept(log_p_group: Tensor, threshold: Tensor) -> Tensor:
    """Whether a cluster or subtree of log-probability ``log_p_group`` may hold a kept class."""
    return ~(log_p_group.detach().exp() * (1.0 + GROUP_SLACK) < threshold)


def as_loss(
    log_p_target: Tensor, kept_mass: Tensor, kept_count: Tensor, threshold: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-row AS-Softmax loss and masked flag from the target's log-probability and the kept
    classes.

    Args:
        log_p_target: ``(M,)`` :math:`\\log p_t`, with gradient.
        kept_mass: ``(M,)`` :math:`\\sum_{i\\ \\mathrm{kept}} p_i` (with gradient) for rows with
            ``threshold > 0``; any value elsewhere.
        kept_count: ``(M,)`` number of kept classes (target included) for those rows.
        threshold: ``(M,)`` :math:`\\tau`.

    Returns:
        ``(loss, masked)``, each ``(M,)``: the loss is :math:`-\\log p_t` where
        :math:`\\tau \\le 0`; exactly 0 (and zero gradient) where only the target is kept;
        :math:`\\log K - \\log p_t` otherwise. The mass is at least the largest probability
        (always kept), so at least ``1 / V``: its log is safe. ``masked`` (bool, detached) marks
        the rows that keep only their target: the keep rule decides it, never the loss value.
    """
    can_mask = threshold > 0
    # Rows that cannot mask read log(1): no log(0) whose gradient (0 * inf) would be NaN.
    mass = torch.where(can_mask, kept_mass, torch.ones_like(kept_mass))
    partial = torch.where(kept_count > 1, mass.log() - log_p_target, torch.zeros_like(log_p_target))
    masked = (can_mask & (kept_count == 1)).detach()
    return torch.where(can_mask, partial, -log_p_target), masked
