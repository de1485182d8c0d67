"""Pure-PyTorch AS-Softmax math (no Lightning import): losses, masks, ratios, the AS-Speed rule."""

from lightning_assoftmax.functional.accumulation import accumulation_steps, next_accumulation_steps
from lightning_assoftmax.functional.linear import (
    linear_as_softmax_cross_entropy,
    linear_as_softmax_loss_and_flags,
    linear_as_softmax_loss_and_stats,
)
from lightning_assoftmax.functional.multi_label import (
    multilabel_as_softmax_keep_mask,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_flags,
    multilabel_as_softmax_loss_and_stats,
    multilabel_masked_sample_ratio,
)
from lightning_assoftmax.functional.single_label import (
    as_softmax_cross_entropy,
    as_softmax_keep_mask,
    as_softmax_loss_and_flags,
    as_softmax_loss_and_stats,
    masked_sample_ratio,
)

__all__ = [
    "accumulation_steps",
    "as_softmax_cross_entropy",
    "as_softmax_keep_mask",
    "as_softmax_loss_and_flags",
    "as_softmax_loss_and_stats",
    "linear_as_softmax_cross_entropy",
    "linear_as_softmax_loss_and_flags",
    "linear_as_softmax_loss_and_stats",
    "masked_sample_ratio",
    "multilabel_as_softmax_keep_mask",
    "multilabel_as_softmax_loss",
    "multilabel_as_softmax_loss_and_flags",
    "multilabel_as_softmax_loss_and_stats",
    "multilabel_masked_sample_ratio",
    "next_accumulation_steps",
]
