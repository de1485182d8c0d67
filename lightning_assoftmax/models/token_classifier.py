"""``TokenClassifier``: one prediction per token (next-token prediction, tagging)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_assoftmax.family import classifier_head
from lightning_assoftmax.functional._checks import check_positive_int, check_real
from lightning_assoftmax.mixin import ASSoftmaxMixin
from lightning_assoftmax.models._common import adamw

__all__ = ["TokenClassifier"]

_LINK_HINT = "The CLI takes it from the datamodule's attribute of the same name."


class TokenClassifier(ASSoftmaxMixin, L.LightningModule):
    """Token embeddings, a GRU, and a linear layer over ``num_classes`` at every position.

    The GRU is unidirectional (left to right), so position ``t`` sees tokens ``<= t`` only, as
    next-token prediction requires; set ``bidirectional=True`` for tagging tasks.

    The logits (N, L, C) are passed to the loss as (N, C, L), the class dimension second as in
    ``F.cross_entropy``; targets (N, L) equal to ``ignore_index`` (default -100, the padding of
    :class:`~lightning_assoftmax.data.BBCNewsTokens`) are skipped by the loss and the metrics.
    ``predict_step`` returns the argmax class of every position (N, L).

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
        **as_softmax_options: Any,
    ) -> None:
        super().__init__(delta=delta, **as_softmax_options)
        self.save_hyperparameters()
        owner = type(self).__name__
        if self.as_softmax_multilabel:
            raise ValueError(f"{owner}: multi-label targets are not supported per token; use multilabel=False.")
        check_positive_int(num_classes, f"{owner}: num_classes", _LINK_HINT)
        check_positive_int(vocab_size, f"{owner}: vocab_size", _LINK_HINT)
        for name, value in (("embed_dim", embed_dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            check_positive_int(value, f"{owner}: {name}")
        check_real(dropout, f"{owner}: dropout", low=0.0, high=1.0, low_inclusive=True)
        self.lr = check_real(lr, f"{owner}: lr", low=0.0, low_inclusive=True)
        self.weight_decay = check_real(weight_decay, f"{owner}: weight_decay", low=0.0, low_inclusive=True)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.GRU(
            embed_dim, hidden_dim, num_layers=num_layers, batch_first=True, bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.output = classifier_head(
            hidden_dim * (2 if bidirectional else 1), num_classes, loss=self.as_softmax_loss_name
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits (N, L, C) of token ids (N, L)."""
        states, _ = self.rnn(self.dropout(self.embedding(input_ids)))
        return self.output(self.dropout(states))

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self(batch["input_ids"])
        return self.as_softmax_loss(logits.transpose(1, 2), batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"]).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self, self.lr, self.weight_decay)
