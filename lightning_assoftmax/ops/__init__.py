"""The loss math behind :mod:`lightning_assoftmax.functional`, apart from the public API.

Each loss is one plain-torch function over ``(M, C)`` rows that returns the per-row loss, its
gradient and the masked flag (:func:`as_softmax_forward_rows`,
:func:`multilabel_as_softmax_forward_rows`), registered as a ``torch.library`` custom op with a
fake implementation and a backward (``lightning_assoftmax::as_softmax_rows``,
``lightning_assoftmax::multilabel_as_softmax_rows``), so eager mode and
``torch.compile(fullgraph=True)`` share it. The public functions validate, reshape and reduce.
"""

from lightning_assoftmax.ops.multi_label import (
    LabelsNotBinary,
    check_binary_labels,
    multilabel_as_softmax_forward_rows,
    multilabel_as_softmax_keep,
    multilabel_as_softmax_rows,
)
from lightning_assoftmax.ops.single_label import (
    TargetOutOfRange,
    as_softmax_forward_rows,
    as_softmax_keep_threshold,
    as_softmax_rows,
    check_class_indices,
    compute_dtype,
    target_out_of_range,
)

__all__ = [
    "LabelsNotBinary",
    "TargetOutOfRange",
    "as_softmax_forward_rows",
    "as_softmax_keep_threshold",
    "as_softmax_rows",
    "check_binary_labels",
    "check_class_indices",
    "compute_dtype",
    "multilabel_as_softmax_forward_rows",
    "multilabel_as_softmax_keep",
    "multilabel_as_softmax_rows",
    "target_out_of_range",
]
