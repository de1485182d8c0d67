"""Fast paths behind :mod:`lightning_assoftmax.functional` (kernels apart from the public API).

Each op takes already-validated tensors and returns per-sample losses with a hand-written
backward; the public functions validate, reshape and reduce. On CPU the ops call compiled C
kernels (:mod:`lightning_assoftmax.ops._native`) and fall back to their torch implementation.
"""

from lightning_assoftmax.ops.multi_label import (
    LabelsNotBinary,
    labels_are_binary,
    multilabel_as_softmax_keep,
    multilabel_as_softmax_rows_loss,
)
from lightning_assoftmax.ops.single_label import (
    TargetOutOfRange,
    as_softmax_keep_threshold,
    as_softmax_rows_loss,
    compute_dtype,
    target_out_of_range,
)

__all__ = [
    "LabelsNotBinary",
    "TargetOutOfRange",
    "as_softmax_keep_threshold",
    "as_softmax_rows_loss",
    "compute_dtype",
    "labels_are_binary",
    "multilabel_as_softmax_keep",
    "multilabel_as_softmax_rows_loss",
    "target_out_of_range",
]
