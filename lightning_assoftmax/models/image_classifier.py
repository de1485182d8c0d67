"""``ImageClassifier``: a small convolutional network for small images."""

from __future__ import annotations

from collections.abc import Sequence
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
    optimizers_with_schedule,
    with_lr_schedule_args,
)

__all__ = ["ImageClassifier"]


@with_lr_schedule_args
class ImageClassifier(ASSoftmaxMixin, L.LightningModule):
    """Three 3x3 convolutions (the second followed by 2x2 max pooling), global average pooling, a
    linear layer. Works for any image size >= 2x2.

    Batches are ``(images, labels)``: images (N, in_channels, H, W) float, labels (N) long
    (or (N, C) 0/1 floats with ``multilabel=True``). ``predict_step`` returns class indices (N),
    ``class_probabilities`` the probabilities (N, C) behind them.

    Args:
        num_classes: number of classes.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        channels: width of the first convolution (the others use twice as many).
        dropout: dropout before the output layer.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay on weight matrices.
        delta: the AS-Softmax margin in [0, 1].
        class_names: the label of each class, in output order (the CLI copies the datamodule's
            ``class_names``), so that a checkpoint names its predictions.
        {lr_schedule_args}
        **as_softmax_options: further :class:`ASSoftmaxMixin` options: ``loss``, ``loss_kwargs``,
            ``multilabel``, ``ignore_index``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        channels: int = 32,
        dropout: float = 0.1,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        delta: float = 0.1,
        class_names: Sequence[str] | None = None,
        lr_schedule: Literal["constant", "linear"] = "constant",
        warmup_fraction: float = 0.0,
        **as_softmax_options: Any,
    ) -> None:
        super().__init__(delta=delta, **as_softmax_options)
        self.save_hyperparameters()
        owner = type(self).__name__
        check_positive_int(num_classes, f"{owner}: num_classes", "The CLI takes it from the datamodule's num_classes.")
        self.class_names = check_class_names(owner, class_names, num_classes)
        check_positive_int(in_channels, f"{owner}: in_channels")
        check_positive_int(channels, f"{owner}: channels")
        check_real(dropout, f"{owner}: dropout", low=0.0, high=1.0, low_inclusive=True)
        self.lr = check_real(lr, f"{owner}: lr", low=0.0, low_inclusive=True)
        self.weight_decay = check_real(weight_decay, f"{owner}: weight_decay", low=0.0, low_inclusive=True)
        self.lr_schedule, self.warmup_fraction = check_lr_schedule(owner, lr_schedule, warmup_fraction)
        wide = 2 * channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, wide, 3, padding=1), nn.BatchNorm2d(wide), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(wide, wide, 3, padding=1), nn.BatchNorm2d(wide), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
            classifier_head(wide, num_classes, loss=self.as_softmax_loss_name),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Logits (N, C) of images (N, in_channels, H, W)."""
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return self.as_softmax_loss(self(images), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.as_softmax_loss(self(images), labels)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.as_softmax_loss(self(images), labels)

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = self(images)
        return logits > 0 if self.as_softmax_multilabel else logits.argmax(dim=-1)

    def class_probabilities(self, batch: tuple[Tensor, Tensor] | Tensor) -> Tensor:
        """Probability of each class (N, C): softmax of the logits, per-class sigmoid for
        multi-label data."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = self(images).float()
        return logits.sigmoid() if self.as_softmax_multilabel else logits.softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        return optimizers_with_schedule(
            self, adamw(self, self.lr, self.weight_decay), self.lr_schedule, self.warmup_fraction
        )
