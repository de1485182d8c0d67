"""The softmax family: the baselines AS-Softmax is compared with, behind one interface.

:func:`build_loss` turns a name into an ``nn.Module`` taking ``(logits, target)`` with the
conventions of ``F.cross_entropy`` (``ignore_index``, ``reduction``); :func:`classifier_head`
gives the output layer that suits the loss (a :class:`CosineClassifier` for ``am_softmax``).
Pure PyTorch: nothing here imports Lightning.
"""

from lightning_assoftmax.family.am_softmax import AMSoftmaxLoss, CosineClassifier
from lightning_assoftmax.family.base import FamilyLoss
from lightning_assoftmax.family.entmax import Entmax15Loss, SparsemaxLoss
from lightning_assoftmax.family.registry import (
    LOSS_NAMES,
    LOSSES,
    build_loss,
    check_loss_name,
    classifier_head,
    loss_kwarg_names,
)
from lightning_assoftmax.family.softmax import (
    LabelSmoothingLoss,
    SoftmaxLoss,
    TemperatureSoftmaxLoss,
)
from lightning_assoftmax.family.sparse_softmax import SparseSoftmaxLoss

__all__ = [
    "AMSoftmaxLoss",
    "CosineClassifier",
    "Entmax15Loss",
    "FamilyLoss",
    "LOSSES",
    "LOSS_NAMES",
    "LabelSmoothingLoss",
    "SoftmaxLoss",
    "SparseSoftmaxLoss",
    "SparsemaxLoss",
    "TemperatureSoftmaxLoss",
    "build_loss",
    "check_loss_name",
    "classifier_head",
    "loss_kwarg_names",
]
