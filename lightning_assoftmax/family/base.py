"""``FamilyLoss``: what every member of the softmax family shares (pure PyTorch, no Lightning).

Each member sees the logits laid out as ``F.cross_entropy`` wants them (``(N, C)``,
``(N, C, d1, ...)`` or ``(C,)``) and an integer target, and only has to say how one row's loss is
computed (and, if it needs more than the logits, which per-element inputs to read off them:
:meth:`FamilyLoss.row_inputs`). The base class validates the input, keeps ignored positions out of
the computation altogether (they get neither loss nor gradient, and a NaN in an ignored row stays
harmless), reduces as ``F.cross_entropy`` does, and counts the rows whose loss is exactly zero.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_assoftmax.functional._checks import check_class_target, check_reduction
from lightning_assoftmax.functional._layout import class_rows, target_rows
from lightning_assoftmax.ops import compute_dtype

__all__ = ["FamilyLoss"]


class FamilyLoss(nn.Module, abc.ABC):
    """Base of the softmax-family losses built by :func:`~lightning_assoftmax.build_loss`.

    Subclasses implement :meth:`row_losses` on the non-ignored rows only and may override
    :meth:`predictive_logits`. Calling the module returns the reduced loss; :meth:`loss_and_stats`
    also returns the counts the Lightning glue logs.

    Args:
        ignore_index: target value whose positions contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored elements; 0 when there are none), ``"sum"`` or
            ``"none"`` (shaped like the target, 0 at ignored positions).

    Attributes:
        name: the name :func:`build_loss` knows the loss by.
        produces_masked_samples: whether a sample can reach an exact zero loss with an exact zero
            gradient on finite logits (a *masked sample* in the AS-Softmax sense). Only then is the
            zero-loss count reported; dense losses (softmax and friends) report 0, since a float32
            cross entropy that rounds to 0 still has a non-zero gradient.
    """

    name: ClassVar[str] = ""
    produces_masked_samples: bool = False

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}.")
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)

    @abc.abstractmethod
    def row_losses(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> Tensor:
        """Loss of each row: logits ``(M, C)`` in float32/float64, target ``(M,)`` -> ``(M,)``.

        Only non-ignored rows are passed, so every target is a valid class index. ``inputs`` are
        the tensors of :meth:`row_inputs`, flattened to ``(M,)`` the same way.
        """

    def row_inputs(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Further per-element inputs of :meth:`row_losses`, each shaped like ``target``.

        Called on the validated, unreshaped logits; none by default. The base class keeps the
        non-ignored elements and casts them to the computation's dtype, as it does the logits.
        """
        return {}

    def row_losses_and_masked(self, logits: Tensor, target: Tensor, **inputs: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`row_losses` plus each row's masked flag ``(M,)`` (bool, detached).

        By default a row is masked when its loss is exactly 0 and :attr:`produces_masked_samples`
        holds (sparse members, whose zero loss comes with a zero gradient); members that compose
        with AS-Softmax override this to take the flag from the keep rule instead.
        """
        rows = self.row_losses(logits, target, **inputs)
        if self.produces_masked_samples:
            masked = rows.detach() == 0
        else:
            masked = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        return rows, masked

    def predictive_logits(self, logits: Tensor) -> Tensor:
        """The logits whose softmax is the model's predicted distribution (identity by default).

        The Lightning glue logs the plain cross entropy of these as ``<stage>/ce_loss``.
        """
        return logits

    def loss_and_stats(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The reduced loss plus ``(masked_count, valid_count)``, both detached 0-dim long tensors.

        ``masked_count`` counts the non-ignored masked samples (see :meth:`loss_and_flags`; 0
        unless :attr:`produces_masked_samples`). ``valid_count`` counts the non-ignored elements.
        """
        loss, masked, valid_count = self.loss_and_flags(logits, target)
        return loss, masked.sum(), valid_count

    def loss_and_flags(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The reduced loss plus each element's masked flag and the number of non-ignored elements.

        Returns:
            ``(loss, masked, valid_count)``: ``masked`` is bool, shaped like ``target`` and false
            at ignored positions (:meth:`row_losses_and_masked` decides it); ``valid_count`` a
            0-dim long tensor. Both detached.
        """
        check_class_target(logits, target, self.ignore_index, self.name or type(self).__name__)
        z, t = class_rows(logits), target_rows(target)
        valid = t != self.ignore_index
        dtype = compute_dtype(z.dtype)
        z_valid = z[valid].to(dtype)
        t_valid = t[valid].long()  # int32 targets are accepted, as by the AS-Softmax loss
        inputs = {
            key: target_rows(value)[valid].to(dtype)
            for key, value in self.row_inputs(logits, target).items()
        }
        self._check_rows(z_valid)
        if z_valid.shape[0] > 0:
            rows, masked_rows = self.row_losses_and_masked(z_valid, t_valid, **inputs)
        else:
            # Empty, but still attached to the graph: an all-ignored batch gives a loss of 0 that
            # backward() accepts (zero gradient) instead of a tensor without grad_fn.
            rows = z_valid.sum(dim=1)
            masked_rows = torch.zeros(0, dtype=torch.bool, device=z.device)
        with torch.no_grad():
            valid_count = valid.sum()
            masked = torch.zeros_like(valid).masked_scatter(valid, masked_rows.detach())
        return self._reduce(rows, valid, target), masked.reshape(target.shape), valid_count

    def mean_weight(self, target: Tensor) -> Tensor:
        """What ``reduction="mean"`` divides by for ``target`` (a detached 0-dim tensor): the
        number of non-ignored elements. Batch means weighted by it average to the mean over all
        the batches' elements (the mixin forms its epoch values so)."""
        return (target != self.ignore_index).sum()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss_and_stats(logits, target)[0]

    # -- internals ----------------------------------------------------------------------------
    def _check_rows(self, logits: Tensor) -> None:
        """Member-specific checks of the non-ignored rows ``(M, C)``; nothing by default."""

    def _reduce(self, rows: Tensor, valid: Tensor, target: Tensor) -> Tensor:
        if self.reduction == "none":
            full = rows.new_zeros(valid.shape).masked_scatter(valid, rows)
            return full.reshape(target.shape)
        total = rows.sum()
        if self.reduction == "sum":
            return total
        return total / valid.sum().clamp(min=1).to(total.dtype)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
