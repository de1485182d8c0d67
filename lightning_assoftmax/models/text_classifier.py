"""``TextClassifier``: bag-of-embeddings by default, or a fine-tuned ``transformers`` encoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lightning_assoftmax._pretrained import BUNDLED_MINILM, load_pretrained_encoder
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

__all__ = ["TextClassifier"]

_LINK_HINT = "The CLI takes it from the datamodule's attribute of the same name."


@with_lr_schedule_args
class TextClassifier(ASSoftmaxMixin, L.LightningModule):
    """Classifies token-id sequences with the AS-Softmax loss; single- or multi-label.

    Two encoders:

    * default (``backbone=None``): a bag of embeddings, the mean of the token embeddings
      (``nn.EmbeddingBag`` weighted by the attention mask), then an MLP. Fast on CPU. The table
      starts from the input word embeddings of ``embeddings`` (default: the bundled MiniLM's,
      384 wide, matching the default tokenizer of the text datamodules), or at random with
      ``embeddings=None``.
    * ``backbone="<name or directory>"``: a Hugging Face ``transformers`` encoder fine-tuned end
      to end, mean-pooled (or its first token) into a linear head. The hub name
      ``sentence-transformers/all-MiniLM-L6-v2`` loads the bundled offline copy; the datamodule's
      ``tokenizer`` must be the same model's.

    Batches are dicts with ``input_ids`` (N, L) long, ``attention_mask`` (N, L) (optional) and
    ``labels``: (N) class indices, or (N, C) 0/1 floats with ``multilabel=True``.
    ``predict_step`` returns class indices (N), or a (N, C) bool tensor for multi-label;
    ``class_probabilities`` the probabilities (N, C) behind them.

    ``head="<name>"`` replaces the final linear layer with an output layer of
    :mod:`lightning_assoftmax.heads` (for many classes; single-label only); ``forward`` then
    returns its exact log-probabilities (N, C).

    Args:
        num_classes: number of classes ``C``.
        vocab_size: size of the embedding table (the tokenizer's vocabulary); bag model only.
        backbone: None for the bag model, else the encoder to fine-tune.
        embeddings: pretrained model whose word embeddings initialize the bag model's table
            (its vocabulary must cover the tokenizer's); None: random initialization.
        freeze_embeddings: keep the pretrained table fixed (faster steps, lower accuracy).
        embed_dim: embedding width of a randomly initialized table.
        hidden_dim: width of the MLP hidden layer (0: a linear head).
        dropout: dropout before each head layer.
        pooling: how a backbone's token states become one vector: ``mean`` or ``first`` ([CLS]).
        lr: AdamW learning rate; None picks 3e-3 for the bag model and 5e-5 for a backbone.
        weight_decay: AdamW weight decay on weight matrices.
        multilabel: targets are multi-hot; uses the multi-label AS-Softmax loss.
        delta: the AS-Softmax margin in [0, 1] (1 is plain softmax cross entropy).
        head: None for a linear output layer, else a :func:`~lightning_assoftmax.heads.build_head`
            name (``dense``, ``adaptive``, ``class_based``, ``hierarchical``, ``sampled``,
            ``nce``); ``loss`` must then be ``"as_softmax"`` or ``"softmax"`` (``dense``: any).
        head_kwargs: keywords of the head.
        class_counts: training count of each class, for the heads that use frequencies; the CLI
            takes it from the datamodule. Kept in the hyperparameters only when the head uses it.
        class_names: the label of each class, in output order (the CLI copies the datamodule's
            ``class_names``), so that a checkpoint names its predictions.
        {lr_schedule_args}
        **as_softmax_options: further :class:`ASSoftmaxMixin` options: ``loss`` (another member
            of the softmax family, e.g. ``"softmax"`` for the plain baseline), ``loss_kwargs``,
            ``ignore_index``.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int | None = None,
        backbone: str | None = None,
        embeddings: str | None = BUNDLED_MINILM,
        freeze_embeddings: bool = False,
        embed_dim: int = 128,
        hidden_dim: int = 128,
        dropout: float = 0.1,
        pooling: Literal["mean", "first"] = "mean",
        lr: float | None = None,
        weight_decay: float = 0.01,
        multilabel: bool = False,
        delta: float = 0.1,
        head: str | None = None,
        head_kwargs: Mapping[str, Any] | None = None,
        class_counts: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        lr_schedule: Literal["constant", "linear"] = "constant",
        warmup_fraction: float = 0.0,
        **as_softmax_options: Any,
    ) -> None:
        super().__init__(delta=delta, multilabel=multilabel, **as_softmax_options)
        self.save_hyperparameters()
        class_counts = keep_class_counts_if_used(self, head, class_counts)
        owner = type(self).__name__
        check_positive_int(num_classes, f"{owner}: num_classes", _LINK_HINT)
        self.class_names = check_class_names(owner, class_names, num_classes)
        if head is not None and self.as_softmax_multilabel:
            raise ValueError(
                f"{owner}: head={head!r} is a single-label output layer; use head=None with multilabel=True."
            )
        check_real(dropout, f"{owner}: dropout", low=0.0, high=1.0, low_inclusive=True)
        if pooling not in ("mean", "first"):
            raise ValueError(f"{owner}: pooling must be 'mean' or 'first', got {pooling!r}.")
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 0:
            raise ValueError(f"{owner}: hidden_dim must be an integer >= 0 (0: linear head), got {hidden_dim!r}.")
        self.lr = check_real(lr if lr is not None else (5e-5 if backbone else 3e-3), f"{owner}: lr", low=0.0, low_inclusive=True)
        self.weight_decay = check_real(weight_decay, f"{owner}: weight_decay", low=0.0, low_inclusive=True)
        self.lr_schedule, self.warmup_fraction = check_lr_schedule(owner, lr_schedule, warmup_fraction)
        self.pooling = pooling
        self.encoder: nn.Module | None = None
        if backbone:
            # from_pretrained returns the model in eval mode; Lightning keeps each module's mode,
            # so without this the encoder's dropout would stay off during fine-tuning.
            self.encoder = load_pretrained_encoder(backbone).train()
            width = int(self.encoder.config.hidden_size)
            table = int(getattr(self.encoder.config, "vocab_size", 0) or 0)
            if vocab_size is not None and table and vocab_size > table:
                raise ValueError(
                    f"{owner}: the tokenizer produces {vocab_size} token ids but backbone {backbone!r} "
                    f"embeds only {table}; use the backbone's own tokenizer (set the datamodule's "
                    f"tokenizer to {backbone!r})."
                )
            self.embedding = None
        else:
            check_positive_int(vocab_size, f"{owner}: vocab_size", _LINK_HINT)
            if embeddings:
                table = _pretrained_word_embeddings(embeddings)
                if table.shape[0] < vocab_size:
                    raise ValueError(
                        f"{owner}: the tokenizer produces {vocab_size} token ids but embeddings "
                        f"{embeddings!r} has only {table.shape[0]} rows; use that model's tokenizer "
                        "in the datamodule, or embeddings=None for a randomly initialized table."
                    )
                self.embedding = nn.EmbeddingBag.from_pretrained(
                    table[:vocab_size].clone(), freeze=bool(freeze_embeddings), mode="sum"
                )
            else:
                check_positive_int(embed_dim, f"{owner}: embed_dim")
                self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, mode="sum")
            width = self.embedding.embedding_dim
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden_dim:
            layers += [nn.Linear(width, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.head_name = head
        self.output: nn.Module | None = None
        if head is None:
            # The loss picks its output layer (a cosine classifier for am_softmax).
            layers.append(classifier_head(width, num_classes, loss=self.as_softmax_loss_name))
        else:
            self.output = output_head(
                owner, width, num_classes, head, head_kwargs, class_counts,
                self.as_softmax_loss_name, self.as_softmax_loss_kwargs,
            )
        self.head = nn.Sequential(*layers)

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pooled text vectors (N, width) of token ids (N, L); ``attention_mask`` (N, L) marks real
        tokens with 1 (padding is left out of the pooling)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.encoder is None:
            mask = attention_mask.to(self.embedding.weight.dtype)
            weights = mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
            return self.embedding(input_ids, per_sample_weights=weights)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "first":
            return states[:, 0]
        mask = attention_mask.to(states.dtype).unsqueeze(-1)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (N, C) of token ids (N, L); with a head, its exact log-probabilities."""
        out = self.head(self.features(input_ids, attention_mask))
        return out if self.output is None else self.output(out)

    def _logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"))

    def _hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """The output layer's input (N, width) when the model has a head."""
        return self.head(self.features(batch["input_ids"], batch.get("attention_mask")))

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        if self.output is not None:
            return self.as_softmax_head_loss(self.output, self._hidden(batch), batch["labels"])
        return self.as_softmax_loss(self._logits(batch), batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.output is not None:
            return self.output.predict(self._hidden(batch))
        logits = self._logits(batch)
        return logits > 0 if self.as_softmax_multilabel else logits.argmax(dim=-1)

    def class_probabilities(self, batch: dict[str, Tensor]) -> Tensor:
        """Probability of each class (N, C): softmax of the logits (the head's exact distribution
        with ``head=``), per-class sigmoid of the scores for multi-label data."""
        if self.output is not None:
            return self.output.log_prob(self._hidden(batch)).exp()
        logits = self._logits(batch).float()
        return logits.sigmoid() if self.as_softmax_multilabel else logits.softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        return optimizers_with_schedule(
            self, adamw(self, self.lr, self.weight_decay), self.lr_schedule, self.warmup_fraction
        )


def _pretrained_word_embeddings(name: str) -> Tensor:
    """The input word-embedding matrix (vocab, width) of a pretrained ``transformers`` model."""
    encoder = load_pretrained_encoder(name)
    return encoder.get_input_embeddings().weight.detach().float()
