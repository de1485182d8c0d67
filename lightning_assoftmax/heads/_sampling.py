"""Proposal distributions and the base of the heads trained on sampled classes (sampled softmax, NCE).

Both heads own a full ``(V, in_features)`` weight and bias, like ``nn.Linear``. In training mode
(``head.train()``) their loss scores the target and ``num_samples`` classes drawn from a proposal
``Q``, shared by every row of the batch; in eval mode it is the exact loss of the full distribution
(see :class:`SamplingHead`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.functional._checks import check_positive_int, check_real
from lightning_assoftmax.heads._structure import check_class_counts, frequency_order
from lightning_assoftmax.heads.base import PREDICT_BLOCK, OutputHead, compute_dtype

__all__ = ["PROPOSALS", "Proposal", "SamplingHead"]

PROPOSALS = ("uniform", "log_uniform", "unigram")


class Proposal(nn.Module):
    r"""A proposal distribution :math:`Q` over ``V`` classes to draw candidates from.

    * ``uniform``: :math:`Q(i) = 1 / V`.
    * ``log_uniform``: Zipf over frequency ranks, :math:`Q(r) = \log\frac{r + 2}{r + 1} / \log(V + 1)`
      for the class of rank :math:`r` (TensorFlow's ``log_uniform_candidate_sampler``); ranks come
      from ``class_counts``, else class ids are taken as ranks.
    * ``unigram``: :math:`Q(i) \propto \max(n_i, 1)^{\mathrm{power}}` from ``class_counts``
      (word2vec: ``power=0.75``); a class never counted is proposed as if counted once, so that
      every class can be drawn and :math:`\log Q` stays finite.

    Attributes:
        probs: ``(V,)`` :math:`Q` (float32); ``log_probs``: :math:`\log Q`, computed in float64.
    """

    def __init__(
        self, kind: str, num_classes: int, counts: Tensor | None = None, power: float = 0.75, owner: str = "Proposal"
    ) -> None:
        super().__init__()
        if kind not in PROPOSALS:
            raise ValueError(f"{owner}: proposal must be one of {', '.join(PROPOSALS)}, got {kind!r}.")
        self.kind = kind
        if kind == "uniform":
            probs = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        elif kind == "log_uniform":
            rank = torch.arange(num_classes, dtype=torch.float64)
            by_rank = torch.log((rank + 2) / (rank + 1)) / math.log(num_classes + 1)
            probs = torch.empty_like(by_rank)
            probs[frequency_order(counts, num_classes)] = by_rank
        else:
            if counts is None:
                raise ValueError(
                    f"{owner}: proposal='unigram' needs class_counts (the training count of each class); "
                    "give them, or use proposal='log_uniform' or 'uniform'."
                )
            weights = counts.clamp(min=1.0) ** power
            probs = weights / weights.sum()
        self.register_buffer("probs", probs.float(), persistent=False)
        self.register_buffer("log_probs", probs.log().float(), persistent=False)

    def sample(self, num_samples: int) -> Tensor:
        """``(num_samples,)`` class ids drawn with replacement (torch's global random generator)."""
        if self.kind == "uniform":
            return torch.randint(0, self.probs.numel(), (num_samples,), device=self.probs.device)
        return torch.multinomial(self.probs, num_samples, replacement=True)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class SamplingHead(OutputHead):
    """Base of ``sampled`` and ``nce``: a full linear layer trained on sampled classes.

    In training mode the loss uses the target and ``num_samples`` candidates drawn from the
    proposal once per call and shared by all rows. In eval mode it is the exact loss of the full
    normalised distribution (cross entropy, or AS-Softmax with ``delta`` where the head takes
    one), as TensorFlow's documentation recommends for evaluating these losses. Passing
    ``candidates`` (a ``(S,)`` tensor of class ids) uses the sampled loss with those candidates in
    either mode (fixed samples, e.g. for tests).

    Args (shared):
        num_samples: candidates per batch, ``S``.
        proposal: ``"uniform"``, ``"log_uniform"`` or ``"unigram"`` (see :class:`Proposal`).
        class_counts: ``(V,)`` training counts of each class (frequency ranks, unigram).
        power: exponent of the unigram proposal.
        bias: a bias per class.
    """

    uses_counts: ClassVar[bool] = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_samples: int,
        proposal: str,
        class_counts: Sequence[float] | Tensor | None,
        power: float,
        bias: bool,
    ) -> None:
        super().__init__(in_features, num_classes)
        owner = type(self).__name__
        self.num_samples = check_positive_int(num_samples, f"{owner}: num_samples")
        self.power = check_real(power, f"{owner}: power", low=0.0, low_inclusive=True)
        counts = check_class_counts(class_counts, num_classes, owner)
        self.proposal = Proposal(proposal, num_classes, counts, self.power, owner)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        self._candidates: Tensor | None = None

    # -- public API: the base's, with optional fixed candidates -------------------------------
    def loss(
        self,
        hidden: Tensor,
        target: Tensor,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        candidates: Tensor | None = None,
    ) -> Tensor:
        """:meth:`OutputHead.loss`; ``candidates`` ``(S,)`` fixes the sampled classes."""
        return self.loss_and_stats(
            hidden, target, delta=delta, ignore_index=ignore_index, reduction=reduction, candidates=candidates
        )[0]

    def loss_and_stats(
        self,
        hidden: Tensor,
        target: Tensor,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        candidates: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`OutputHead.loss_and_stats`; ``candidates`` ``(S,)`` fixes the sampled classes."""
        loss, masked, valid_count = self.loss_and_flags(
            hidden, target, delta=delta, ignore_index=ignore_index, reduction=reduction, candidates=candidates
        )
        return loss, masked.sum(), valid_count

    def loss_and_flags(
        self,
        hidden: Tensor,
        target: Tensor,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        candidates: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`OutputHead.loss_and_flags`; ``candidates`` ``(S,)`` fixes the sampled classes."""
        self._candidates = self._check_candidates(candidates)
        try:
            return super().loss_and_flags(hidden, target, delta=delta, ignore_index=ignore_index, reduction=reduction)
        finally:
            self._candidates = None

    def sample_candidates(self) -> Tensor:
        """``(num_samples,)`` candidates drawn from the proposal."""
        return self.proposal.sample(self.num_samples)

    # -- helpers for the subclasses ------------------------------------------------------------
    def use_samples(self) -> bool:
        return self.training or self._candidates is not None

    def candidates(self) -> Tensor:
        return self._candidates if self._candidates is not None else self.sample_candidates()

    def logits(self, hidden: Tensor) -> Tensor:
        """Full scores ``(M, V)`` in the compute dtype."""
        return F.linear(hidden, self.weight, self.bias).to(compute_dtype(hidden.dtype))

    def scores_of(self, hidden: Tensor, classes: Tensor) -> Tensor:
        """Scores ``(M, S)`` of the shared ``classes`` ``(S,)`` for every row."""
        bias = self.bias[classes] if self.bias is not None else None
        return F.linear(hidden, self.weight[classes], bias).to(compute_dtype(hidden.dtype))

    def target_scores(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Score ``(M,)`` of each row's own target."""
        scores = (hidden * self.weight[target]).sum(dim=1)
        if self.bias is not None:
            scores = scores + self.bias[target]
        return scores.to(compute_dtype(hidden.dtype))

    def log_prob_rows(self, hidden: Tensor) -> Tensor:
        return F.log_softmax(self.logits(hidden), dim=1)

    def predict_rows(self, hidden: Tensor) -> Tensor:
        rows = max(1, PREDICT_BLOCK // self.num_classes)
        parts = [F.linear(block, self.weight, self.bias).argmax(dim=1) for block in hidden.split(rows)]
        return torch.cat(parts) if parts else hidden.new_empty(0, dtype=torch.long)

    def _check_candidates(self, candidates: Tensor | None) -> Tensor | None:
        if candidates is None:
            return None
        owner = self.name
        if not isinstance(candidates, Tensor) or candidates.dim() != 1 or candidates.is_floating_point() or candidates.dtype == torch.bool:
            raise TypeError(f"{owner}: candidates must be a 1-D integer tensor of class ids, got {candidates!r}.")
        if candidates.numel() == 0:
            raise ValueError(f"{owner}: candidates must hold at least one class id.")
        low, high = int(candidates.min()), int(candidates.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"{owner}: candidates must be class ids in [0, {self.num_classes}), got {low if low < 0 else high}.")
        return candidates.long()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_samples={self.num_samples}, bias={self.bias is not None}"
