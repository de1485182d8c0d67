"""``OutputHead``: what every output layer in :mod:`lightning_assoftmax.heads` shares.

An output head owns the class weights and maps hidden states ``(..., in_features)`` to a
distribution over ``num_classes`` classes. The base class validates the input, flattens it to rows,
keeps ignored positions out of the computation (they get neither loss nor gradient), reduces as
``F.cross_entropy`` does and counts the rows whose loss is exactly zero. Subclasses say how the
loss of valid rows, the full log-probabilities and the prediction are computed.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_assoftmax.functional._checks import (
    check_delta,
    check_ignore_index,
    check_positive_int,
    check_reduction,
)

__all__ = ["OutputHead"]

#: Elements of a ``(rows, classes)`` block that :meth:`OutputHead.predict` scores at once.
PREDICT_BLOCK = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-probabilities and losses are computed in at least float32 (half inputs are accepted)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def graph_anchor(parameters: Iterable[nn.Parameter], like: Tensor) -> Tensor:
    """A 0-dim zero attached to ``parameters``: added to a loss, it gives them an all-zero gradient.

    Distributed data parallel expects every parameter to receive a gradient in every step; a tail
    cluster without targets in a batch would otherwise get none on this process.
    """
    anchor = like.new_zeros(())
    for param in parameters:
        anchor = anchor + param.reshape(-1)[:0].sum().to(like.dtype)
    return anchor


class OutputHead(nn.Module, abc.ABC):
    """Base of the output layers built by :func:`~lightning_assoftmax.heads.build_head`.

    Shapes: ``hidden`` is ``(..., in_features)`` and ``target`` its leading shape ``(...)`` of class
    indices (``ignore_index`` where there is none). :meth:`log_prob` returns ``(..., num_classes)``,
    :meth:`predict` ``(...)``; calling the module is :meth:`log_prob`.

    Attributes:
        name: the name :func:`build_head` knows the head by.
        supports_delta: whether :meth:`loss` takes ``delta`` (AS-Softmax).
        exact_delta: whether the AS-Softmax loss equals ``as_softmax_cross_entropy`` of
            :meth:`log_prob` (else it is an approximation, documented by the head).
    """

    name: ClassVar[str] = ""
    supports_delta: ClassVar[bool] = True
    exact_delta: ClassVar[bool] = True

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_features = check_positive_int(in_features, f"{owner}: in_features")
        self.num_classes = check_positive_int(num_classes, f"{owner}: num_classes")

    # -- what subclasses implement (on valid rows: hidden (M, H), targets in [0, V)) -------------
    @abc.abstractmethod
    def row_losses(self, hidden: Tensor, target: Tensor, delta: float | None) -> Tensor:
        """Loss ``(M,)`` of each row (float32 for half inputs)."""

    @abc.abstractmethod
    def log_prob_rows(self, hidden: Tensor) -> Tensor:
        """Exact log-probabilities ``(M, V)`` of every class."""

    def predict_rows(self, hidden: Tensor) -> Tensor:
        """Most probable class ``(M,)``; by default the argmax of :meth:`log_prob_rows` in blocks of
        rows, so that at most :data:`PREDICT_BLOCK` scores exist at once."""
        rows = max(1, PREDICT_BLOCK // self.num_classes)
        parts = [self.log_prob_rows(block).argmax(dim=1) for block in hidden.split(rows)]
        return torch.cat(parts) if parts else hidden.new_empty(0, dtype=torch.long)

    def row_losses_and_masked(self, hidden: Tensor, target: Tensor, delta: float | None) -> tuple[Tensor, Tensor]:
        """:meth:`row_losses` plus each row's masked flag ``(M,)`` (bool, detached): true where
        AS-Softmax's keep rule keeps only the target. None by default; heads that take ``delta``
        override it."""
        losses = self.row_losses(hidden, target, delta)
        return losses, torch.zeros(losses.shape, dtype=torch.bool, device=losses.device)

    def counts_masked(self, delta: float | None) -> bool:
        """Whether the head reports masked samples (AS-Softmax, whose masked rows have an exact
        zero loss and gradient) for this ``delta``."""
        return delta is not None

    # -- public API --------------------------------------------------------------------------
    def loss(
        self,
        hidden: Tensor,
        target: Tensor,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> Tensor:
        """The training loss; ``delta`` in ``[0, 1]`` applies AS-Softmax (``None``: the head's own loss).

        Args:
            hidden: ``(..., in_features)`` hidden states.
            target: ``(...)`` class indices; ``ignore_index`` positions get neither loss nor gradient.
            delta: the AS-Softmax margin, or ``None``.
            ignore_index: target value to skip.
            reduction: ``"mean"`` (over non-ignored positions, divided by :meth:`mean_weight`;
                0 if there are none), ``"sum"`` or ``"none"`` (shaped like ``target``, 0 at
                ignored positions).
        """
        return self.loss_and_stats(hidden, target, delta=delta, ignore_index=ignore_index, reduction=reduction)[0]

    def loss_and_stats(
        self,
        hidden: Tensor,
        target: Tensor,
        *,
        delta: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`loss` plus ``(masked_count, valid_count)``, detached 0-dim long tensors.

        ``masked_count`` counts the non-ignored positions that keep only their target when
        ``delta`` is given (AS-Softmax masked samples, see :meth:`loss_and_flags`), else 0;
        ``valid_count`` the non-ignored positions.
        """
        loss, masked, valid_count = self.loss_and_flags(
            hidden, target, delta=delta, ignore_index=ignore_index, reduction=reduction
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`loss` plus each position's masked flag and the number of non-ignored positions.

        Returns:
            ``(loss, masked, valid_count)``: ``masked`` is bool, shaped like ``target``, true where
            AS-Softmax's keep rule keeps only the target (decided by the rule, never by the loss
            value: at ``delta=1`` nothing is masked), false at ignored positions and wherever
            :meth:`counts_masked` is false; ``valid_count`` a 0-dim long tensor. Both detached.
        """
        delta = self._check_delta(delta)
        ignore_index = check_ignore_index(ignore_index)
        reduction = check_reduction(reduction)
        rows, flat_target = self._rows(hidden, target, ignore_index)
        valid = flat_target != ignore_index
        hidden_valid, target_valid = rows[valid], flat_target[valid]
        cdtype = compute_dtype(hidden.dtype)
        if target_valid.numel():
            losses, masked_rows = self.row_losses_and_masked(hidden_valid, target_valid, delta)
        else:
            # Still attached to the graph (hidden and every parameter): backward through an
            # all-ignored batch works and gives zero gradients everywhere.
            losses = hidden_valid.sum(dim=1).to(cdtype) + graph_anchor(self.parameters(), hidden_valid.to(cdtype))
            masked_rows = torch.zeros(0, dtype=torch.bool, device=valid.device)
        with torch.no_grad():
            valid_count = valid.sum()
            masked = torch.zeros_like(valid)
            if self.counts_masked(delta):
                masked = masked.masked_scatter(valid, masked_rows.detach())
            masked = masked.reshape(target.shape)
        if reduction == "none":
            full = losses.new_zeros(valid.shape).masked_scatter(valid, losses)
            return full.reshape(target.shape), masked, valid_count
        total = losses.sum()
        if reduction == "mean":
            with torch.no_grad():
                norm = self.mean_weight(flat_target, ignore_index=ignore_index)
            total = total / torch.where(norm > 0, norm, torch.ones_like(norm)).to(total.dtype)
        return total, masked, valid_count

    def mean_weight(self, target: Tensor, *, ignore_index: int = -100) -> Tensor:
        """What ``reduction="mean"`` divides the summed loss by for ``target`` (a 0-dim tensor):
        the number of non-ignored positions (a class-weighted loss: the sum of their weights).
        Batch means weighted by it average to the mean over all the batches' positions."""
        return (target != ignore_index).sum()

    def log_prob(self, hidden: Tensor) -> Tensor:
        """Exact log-probabilities ``(..., num_classes)`` of the head's normalised distribution
        (float32 for half inputs); each row's probabilities sum to 1."""
        rows = self._hidden_rows(hidden)
        return self.log_prob_rows(rows).reshape(*hidden.shape[:-1], self.num_classes)

    def predict(self, hidden: Tensor) -> Tensor:
        """The most probable class ``(...)`` of each hidden state (the argmax of :meth:`log_prob`)."""
        rows = self._hidden_rows(hidden)
        with torch.no_grad():
            return self.predict_rows(rows).reshape(hidden.shape[:-1])

    def forward(self, hidden: Tensor) -> Tensor:
        return self.log_prob(hidden)

    # -- internals ---------------------------------------------------------------------------
    def _check_delta(self, delta: float | None) -> float | None:
        if delta is None:
            return None
        if not self.supports_delta:
            raise ValueError(self._no_delta_message())
        return check_delta(delta)

    def _no_delta_message(self) -> str:
        return f"head {self.name!r} takes no delta."

    def _hidden_rows(self, hidden: Tensor) -> Tensor:
        owner = self.name or type(self).__name__
        if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
            kind = f"a {hidden.dtype} tensor" if isinstance(hidden, Tensor) else type(hidden).__name__
            raise TypeError(f"{owner}: hidden must be a floating-point tensor, got {kind}.")
        if hidden.dim() == 0 or hidden.shape[-1] != self.in_features:
            raise ValueError(
                f"{owner}: hidden must be shaped (..., in_features={self.in_features}), got "
                f"{tuple(hidden.shape)}."
            )
        return hidden.reshape(-1, self.in_features)

    def _rows(self, hidden: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        owner = self.name or type(self).__name__
        rows = self._hidden_rows(hidden)
        if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            kind = f"a {target.dtype} tensor" if isinstance(target, Tensor) else type(target).__name__
            raise TypeError(f"{owner}: target must be an integer tensor of class indices, got {kind}.")
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"{owner}: target must have the leading shape of hidden, {tuple(hidden.shape[:-1])}, got "
                f"{tuple(target.shape)}."
            )
        flat = target.reshape(-1)
        in_use = flat[flat != ignore_index]
        if in_use.numel():
            low, high = (int(v) for v in torch.aminmax(in_use))
            if low < 0 or high >= self.num_classes:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{owner}: target class {bad} is out of range [0, {self.num_classes}) and is not "
                    f"ignore_index ({ignore_index})."
                )
        return rows, flat.long()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
