"""``TokenClassifier``: one prediction per token (next-token prediction, tagging)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lightning_assoftmax.family import classifier_head
from lightning_assoftmax.functional._checks import check_positive_int, check_real
from lightning_assoftmax.mixin import ASSoftmaxMixin
from lightning_assoftmax.models._common import (
    adamw,
    check_class_names,
    check_lr_schedule,
    keep_class_counts_if_used,
    optimizers_with_schedule,
    output_head,
    with_lr_schedule_args,
)

__all__ = ["TokenClassifier"]

_LINK_HINT = "The CLI takes it from the datamodule's attribute of the same name."


@with_lr_schedule_args
class TokenClassifier(ASSoftmaxMixin, L.LightningModule):
    """Token embeddings, a GRU, and a linear layer over ``num_classes`` at every position.

    The GRU is unidirectional (left to right), so position ``t`` sees tokens ``<= t`` only, as
    next-token prediction requires; set ``bidirectional=True`` for tagging tasks.

    The logits (N, L, C) are passed to the loss as (N, C, L), the class dimension second as in
    ``F.cross_entropy``; targets (N, L) equal to ``ignore_index`` (default -100, the padding of
    :class:`~lightning_assoftmax.data.BBCNewsTokens`) are skipped by the loss and the metrics.
    ``predict_step`` returns the argmax class of every position (N, L). In training with
    ``loss="as_softmax"`` or ``"softmax"`` the linear layer and the loss are fused
    (:meth:`~lightning_assoftmax.mixin.ASSoftmaxMixin.as_softmax_linear_loss`): the (N, L, C) logits
    and their gradient are formed a chunk of rows at a time, never for the whole batch.

    With ``head="<name>"`` the output layer is one of :mod:`lightning_assoftmax.heads` (e.g.
    ``"adaptive"``) instead of a linear layer: it takes the GRU states (N, L, hidden) and never
    computes most of the (N, L, C) scores in training; ``forward`` then returns the head's exact
    log-probabilities (N, L, C), and the validation ``ce_loss`` and ``acc`` come from them.

    Args:
        num_classes: classes per token (30522 for next-token prediction over WordPiece ids).
        vocab_size: size of the input embedding table.
        embed_dim: embedding width.
        hidden_dim: GRU state width (per direction).
        num_layers: stacked GRU layers.
        bidirectional: read the sequence both ways (tagging; not for next-token prediction).
        dropout: dropout on the embeddings and before the output layer.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay on weight matrices.
        delta: the AS-Softmax margin in [0, 1].
        head: None for a linear output layer, else a :func:`~lightning_assoftmax.heads.build_head`
            name: ``dense``, ``adaptive``, ``class_based``, ``hierarchical``, ``sampled`` or
            ``nce``. With a head, ``loss`` must be ``"as_softmax"`` (AS-Softmax on the head, exact
            on the tree-shaped heads) or ``"softmax"`` (the head's own loss; the only choice for
            ``nce``); ``dense`` takes any loss.
        head_kwargs: keywords of the head (e.g. ``{"cutoffs": [2000, 10000]}``).
        class_counts: training count of each class, for the heads that use frequencies; the CLI
            takes it from the datamodule. Kept in the hyperparameters only when the head uses it.
        class_names: the label of each class, in output order (e.g. the tags of a tagging task),
            so that a checkpoint names its predictions; None for token ids.
        {lr_schedule_args}
        **as_softmax_options: further :class:`ASSoftmaxMixin` options: ``loss``, ``loss_kwargs``,
            ``ignore_index``.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int | None = None,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.1,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        head: str | None = None,
        head_kwargs: Mapping[str, Any] | None = None,
        class_counts: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        lr_schedule: Literal["constant", "linear"] = "constant",
        warmup_fraction: float = 0.0,
        **as_softmax_options: Any,
    ) -> None:
        super().__init__(delta=delta, **as_softmax_options)
        self.save_hyperparameters()
        class_counts = keep_class_counts_if_used(self, head, class_counts)
        owner = type(self).__name__
        check_positive_int(num_classes, f"{owner}: num_classes", _LINK_HINT)
        self.class_names = check_class_names(owner, class_names, num_classes)
        if self.as_softmax_multilabel:
            raise ValueError(f"{owner}: multi-label targets are not supported per token; use multilabel=False.")
        check_positive_int(vocab_size, f"{owner}: vocab_size", _LINK_HINT)
        for name, value in (("embed_dim", embed_dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            check_positive_int(value, f"{owner}: {name}")
        check_real(dropout, f"{owner}: dropout", low=0.0, high=1.0, low_inclusive=True)
        self.lr = check_real(lr, f"{owner}: lr", low=0.0, low_inclusive=True)
        self.weight_decay = check_real(weight_decay, f"{owner}: weight_decay", low=0.0, low_inclusive=True)
        self.lr_schedule, self.warmup_fraction = check_lr_schedule(owner, lr_schedule, warmup_fraction)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.GRU(
            embed_dim, hidden_dim, num_layers=num_layers, batch_first=True, bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        width = hidden_dim * (2 if bidirectional else 1)
        self.head_name = head
        if head is None:
            self.output = classifier_head(width, num_classes, loss=self.as_softmax_loss_name)
        else:
            self.output = output_head(
                owner, width, num_classes, head, head_kwargs, class_counts,
                self.as_softmax_loss_name, self.as_softmax_loss_kwargs,
            )

    def features(self, input_ids: Tensor) -> Tensor:
        """Hidden states (N, L, hidden) of token ids (N, L), the output layer's input."""
        states, _ = self.rnn(self.dropout(self.embedding(input_ids)))
        return self.dropout(states)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits (N, L, C) of token ids (N, L); with a head, its exact log-probabilities."""
        return self.output(self.features(input_ids))

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        if self.head_name is not None:
            return self.as_softmax_head_loss(self.output, self.features(batch["input_ids"]), batch["labels"])
        if type(self.output) is nn.Linear:
            # Training never holds the (N, L, C) logits (see as_softmax_linear_loss).
            return self.as_softmax_linear_loss(
                self.features(batch["input_ids"]), self.output.weight, batch["labels"], self.output.bias
            )
        logits = self(batch["input_ids"])
        return self.as_softmax_loss(logits.transpose(1, 2), batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.head_name is not None:
            return self.output.predict(self.features(batch["input_ids"]))
        return self(batch["input_ids"]).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        return optimizers_with_schedule(
            self, adamw(self, self.lr, self.weight_decay), self.lr_schedule, self.warmup_fraction
        )
