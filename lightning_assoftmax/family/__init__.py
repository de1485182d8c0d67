"""The softmax family: the baselines AS-Softmax is compared with, behind one interface.

:func:`build_loss` turns a name into an ``nn.Module`` taking ``(logits, target)`` with the
conventions of ``F.cross_entropy`` (``ignore_index``, ``reduction``); :func:`classifier_head`
gives the output layer that suits the loss (a :class:`CosineClassifier` for the cosine-margin
losses, a :class:`NormPreservingClassifier` for ``l_softmax`` and ``sphereface``, ...).
The large-margin members share :class:`MarginLoss`: margin logits, then optionally AS-Softmax's
keep mask (``delta``), then cross entropy. Pure PyTorch: nothing here imports Lightning.
"""

from lightning_assoftmax.family.am_softmax import AMSoftmaxLoss, CosFaceLoss, CosineClassifier
from lightning_assoftmax.family.base import FamilyLoss
from lightning_assoftmax.family.classifiers import (
    NormalizedFeatureClassifier,
    NormedLogits,
    NormPreservingClassifier,
)
from lightning_assoftmax.family.cosine_margin import ArcFaceLoss, NormFaceLoss
from lightning_assoftmax.family.entmax import Entmax15Loss, SparsemaxLoss
from lightning_assoftmax.family.l2_softmax import L2SoftmaxLoss
from lightning_assoftmax.family.l_softmax import (
    LargeMarginSoftmaxLoss,
    SphereFaceLoss,
    angular_margin_psi,
)
from lightning_assoftmax.family.margin import CosineMarginLoss, MarginLoss
from lightning_assoftmax.family.registry import (
    HEADS,
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
from lightning_assoftmax.family.weighted_softmax import (
    WeightedSoftmaxLoss,
    balanced_class_weights,
    count_class_labels,
)

__all__ = [
    "AMSoftmaxLoss",
    "ArcFaceLoss",
    "CosFaceLoss",
    "CosineClassifier",
    "CosineMarginLoss",
    "Entmax15Loss",
    "FamilyLoss",
    "HEADS",
    "L2SoftmaxLoss",
    "LOSSES",
    "LOSS_NAMES",
    "LabelSmoothingLoss",
    "LargeMarginSoftmaxLoss",
    "MarginLoss",
    "NormFaceLoss",
    "NormPreservingClassifier",
    "NormalizedFeatureClassifier",
    "NormedLogits",
    "SoftmaxLoss",
    "SparseSoftmaxLoss",
    "SparsemaxLoss",
    "SphereFaceLoss",
    "TemperatureSoftmaxLoss",
    "WeightedSoftmaxLoss",
    "angular_margin_psi",
    "balanced_class_weights",
    "build_loss",
    "check_loss_name",
    "classifier_head",
    "count_class_labels",
    "loss_kwarg_names",
]
