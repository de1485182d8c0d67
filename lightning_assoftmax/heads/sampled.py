r"""``SampledSoftmaxHead``: sampled softmax / importance sampling (Bengio & Senecal, IEEE TNN 2008;
Jean et al., ACL 2015), with TensorFlow's ``sampled_softmax_loss`` semantics.

``S`` candidates :math:`s_1..s_S` are drawn with replacement from a proposal :math:`Q`, once per
batch. Each row's softmax runs over its target and the candidates, every logit corrected by
:math:`-\log Q`; a candidate equal to the row's target (an *accidental hit*) is removed:

.. math:: \ell = -\log \frac{e^{z_t - \log Q(t)}}{e^{z_t - \log Q(t)} + \sum_{j:\, s_j \ne t} e^{z_{s_j} - \log Q(s_j)}} .

With every class as a candidate and a uniform :math:`Q` this is the full softmax cross entropy.
The scores of a batch are ``(N, S)`` instead of ``(N, V)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_assoftmax.functional._checks import check_flag, check_real
from lightning_assoftmax.functional.single_label import as_softmax_loss_and_flags
from lightning_assoftmax.heads._sampling import SamplingHead

__all__ = ["SampledSoftmaxHead"]


class SampledSoftmaxHead(SamplingHead):
    r"""Sampled softmax output layer.

    Args:
        in_features: width of the hidden states.
        num_classes: number of classes ``V``.
        num_samples: candidates per batch ``S`` (shared by its rows).
        proposal: ``"log_uniform"`` (default), ``"uniform"`` or ``"unigram"``; see
            :class:`~lightning_assoftmax.heads._sampling.Proposal`.
        class_counts: ``(V,)`` training counts (frequency ranks for ``log_uniform``; ``unigram``).
        power: exponent of the unigram proposal (word2vec: 0.75).
        remove_accidental_hits: drop candidates equal to the row's target (TensorFlow's default).
        z_loss: weight :math:`\alpha` of the self-normalisation penalty
            :math:`\alpha (\log \hat Z)^2` (Devlin et al., ACL 2014), with the importance-sampling
            estimate :math:`\hat Z = \frac{1}{S}\sum_j e^{z_{s_j}} / Q(s_j)` in training and the
            exact :math:`Z` in eval mode; 0 disables it.
        bias: a bias per class.

    **AS-Softmax** (``delta``) on this head is an approximation: classes are kept or masked
    within the sampled distribution (target and candidates, :math:`-\log Q` corrected), whose
    probabilities differ from the full softmax's. In eval mode the AS loss is exact.

    Example:
        >>> import torch
        >>> head = SampledSoftmaxHead(16, 1000, num_samples=64)
        >>> hidden, target = torch.randn(8, 16), torch.randint(0, 1000, (8,))
        >>> head.loss(hidden, target).shape  # training mode: 64 sampled candidates
        torch.Size([])
    """

    name = "sampled"
    exact_delta = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_samples: int = 1024,
        proposal: str = "log_uniform",
        class_counts: Sequence[float] | Tensor | None = None,
        power: float = 0.75,
        remove_accidental_hits: bool = True,
        z_loss: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, num_classes, num_samples, proposal, class_counts, power, bias)
        owner = type(self).__name__
        self.remove_accidental_hits = check_flag(f"{owner}: remove_accidental_hits", remove_accidental_hits)
        self.z_loss = check_real(z_loss, f"{owner}: z_loss", low=0.0, low_inclusive=True)

    def counts_masked(self, delta: float | None) -> bool:
        return delta is not None and self.z_loss == 0

    def row_losses(self, hidden: Tensor, target: Tensor, delta: float | None) -> Tensor:
        return self.row_losses_and_masked(hidden, target, delta)[0]

    def row_losses_and_masked(self, hidden: Tensor, target: Tensor, delta: float | None) -> tuple[Tensor, Tensor]:
        if not self.use_samples():
            logits = self.logits(hidden)
            losses, masked = _cross_entropy(logits, target, delta)
            if self.z_loss:
                losses = losses + self.z_loss * torch.logsumexp(logits, dim=1) ** 2
                masked = torch.zeros_like(masked)
            return losses, masked
        candidates = self.candidates()
        log_q = self.proposal.log_probs
        true = self.target_scores(hidden, target)
        true = true - log_q[target].to(true.dtype)
        sampled = self.scores_of(hidden, candidates) - log_q[candidates].to(true.dtype)
        log_z = None
        if self.z_loss:
            # Importance-sampling estimate of log Z over all candidates, hits included (unbiased Z).
            log_z = torch.logsumexp(sampled, dim=1) - math.log(candidates.numel())
        if self.remove_accidental_hits:
            sampled = sampled.masked_fill(candidates.unsqueeze(0) == target.unsqueeze(1), -torch.inf)
        scores = torch.cat([true.unsqueeze(1), sampled], dim=1)
        losses, masked = _cross_entropy(scores, torch.zeros_like(target), delta)
        if log_z is not None:
            losses = losses + self.z_loss * log_z**2
            masked = torch.zeros_like(masked)
        return losses, masked

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, proposal={self.proposal.kind!r}, "
            f"remove_accidental_hits={self.remove_accidental_hits}, z_loss={self.z_loss}"
        )


def _cross_entropy(scores: Tensor, target: Tensor, delta: float | None) -> tuple[Tensor, Tensor]:
    """Each row's loss and masked flag (AS-Softmax's keep rule with ``delta``; none without)."""
    if delta is None:
        losses = F.cross_entropy(scores, target, reduction="none")
        return losses, torch.zeros(losses.shape, dtype=torch.bool, device=losses.device)
    losses, masked, _ = as_softmax_loss_and_flags(scores, target, delta, reduction="none")
    return losses, masked
