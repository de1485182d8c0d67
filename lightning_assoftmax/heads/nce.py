r"""``NCEHead``: noise-contrastive estimation (Gutmann & Hyvarinen, AISTATS 2010; Mnih & Teh, ICML
2012) and negative sampling (Mikolov et al., NeurIPS 2013).

Both train binary classifiers that tell the target from ``k`` noise classes drawn from a proposal
:math:`Q` (shared by the batch). With scores :math:`z` and :math:`\Delta(i) = z_i - \log(k\,Q(i))`:

.. math:: \ell_{\mathrm{NCE}} = -\log\sigma(\Delta(t)) - \sum_{j=1}^{k} \log\sigma(-\Delta(s_j)),
          \qquad
          \ell_{\mathrm{NEG}} = -\log\sigma(z_t) - \sum_{j=1}^{k} \log\sigma(-z_{s_j}).

NCE treats :math:`e^{z_i}` as the unnormalised model probability with :math:`\log Z` fixed at 0,
so its scores become self-normalised; negative sampling drops the :math:`\log(k Q)` correction and
so no longer estimates the softmax. The head's distribution, for :meth:`log_prob` and evaluation,
is the exact :math:`\mathrm{softmax}(z)` either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_assoftmax.functional._checks import check_flag
from lightning_assoftmax.heads._sampling import SamplingHead

__all__ = ["NCEHead", "OBJECTIVES"]

OBJECTIVES = ("nce", "negative_sampling")


class NCEHead(SamplingHead):
    r"""Noise-contrastive estimation / negative sampling output layer.

    Args:
        in_features: width of the hidden states.
        num_classes: number of classes ``V``.
        objective: ``"nce"`` or ``"negative_sampling"``.
        num_samples: noise classes per batch ``k`` (shared by its rows).
        proposal: ``"log_uniform"`` (default), ``"uniform"`` or ``"unigram"``; see
            :class:`~lightning_assoftmax.heads._sampling.Proposal`.
        class_counts: ``(V,)`` training counts (frequency ranks for ``log_uniform``; ``unigram``).
        power: exponent of the unigram proposal (word2vec: 0.75).
        remove_accidental_hits: drop noise samples equal to the row's target; default ``None``
            follows each method's reference: kept for ``nce`` (TensorFlow's ``nce_loss``), dropped
            for ``negative_sampling`` (word2vec).
        bias: a bias per class; for ``nce`` it starts at :math:`-\log V`, so that the model starts
            self-normalised (:math:`\sum_i e^{z_i} \approx 1`).

    AS-Softmax is undefined here (there is no per-row distribution being trained to keep or mask
    classes of): ``delta`` is refused.

    Example:
        >>> import torch
        >>> head = NCEHead(16, 1000, objective="negative_sampling", num_samples=20)
        >>> head.loss(torch.randn(8, 16), torch.randint(0, 1000, (8,))).shape
        torch.Size([])
    """

    name = "nce"
    supports_delta = False
    exact_delta = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        objective: str = "nce",
        num_samples: int = 1024,
        proposal: str = "log_uniform",
        class_counts: Sequence[float] | Tensor | None = None,
        power: float = 0.75,
        remove_accidental_hits: bool | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, num_classes, num_samples, proposal, class_counts, power, bias)
        owner = type(self).__name__
        if objective not in OBJECTIVES:
            raise ValueError(f"{owner}: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
        self.objective = objective
        if remove_accidental_hits is None:
            remove_accidental_hits = objective == "negative_sampling"
        self.remove_accidental_hits = check_flag(f"{owner}: remove_accidental_hits", remove_accidental_hits)
        if objective == "nce" and self.bias is not None:
            torch.nn.init.constant_(self.bias, -math.log(num_classes))

    def _no_delta_message(self) -> str:
        return (
            f"head 'nce' ({self.objective}) takes no delta: AS-Softmax keeps or masks classes of a "
            "normalised per-row distribution, and noise-contrastive estimation and negative sampling "
            "train binary target-vs-noise classifiers instead. Pass delta=None (in the ready-made "
            "models: loss='softmax'), or use head 'sampled' for AS-Softmax over sampled classes."
        )

    def row_losses(self, hidden: Tensor, target: Tensor, delta: float | None) -> Tensor:
        if not self.use_samples():
            return F.cross_entropy(self.logits(hidden), target, reduction="none")
        noise = self.candidates()
        true = self.target_scores(hidden, target)
        sampled = self.scores_of(hidden, noise)
        if self.objective == "nce":
            log_kq = self.proposal.log_probs.to(true.dtype) + math.log(noise.numel())
            true = true - log_kq[target]
            sampled = sampled - log_kq[noise]
        noise_terms = F.logsigmoid(-sampled)
        if self.remove_accidental_hits:
            hits = noise.unsqueeze(0) == target.unsqueeze(1)
            noise_terms = torch.where(hits, torch.zeros_like(noise_terms), noise_terms)
        return -F.logsigmoid(true) - noise_terms.sum(dim=1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, objective={self.objective!r}, proposal={self.proposal.kind!r}, "
            f"remove_accidental_hits={self.remove_accidental_hits}"
        )
