"""lightning_assoftmax: Adaptive Sparse Softmax (Lv et al., TASLP 2025) for PyTorch Lightning.

Layers, bottom to top: :mod:`.functional` (pure PyTorch math), :mod:`.losses`, :mod:`.metrics`
and :mod:`.family` (modules on it: AS-Softmax and the baseline losses), :mod:`.mixin` and
:mod:`.callbacks` (Lightning glue).
"""

from lightning_assoftmax.callbacks import (
    AdaptiveGradAccumulation,
    CompactProgressBar,
    DeltaWarmup,
    LossAccuracyCorrelation,
    MarginAnnealing,
    PredictionWriter,
    SkipMaskedSamples,
)
from lightning_assoftmax.family import CosineClassifier, build_loss, classifier_head
from lightning_assoftmax.losses import ASSoftmaxLoss, LinearASSoftmaxLoss, MultiLabelASSoftmaxLoss
from lightning_assoftmax.metrics import MaskedSampleRatio
from lightning_assoftmax.mixin import ASSoftmaxMixin

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGradAccumulation",
    "ASSoftmaxLoss",
    "ASSoftmaxMixin",
    "CompactProgressBar",
    "CosineClassifier",
    "DeltaWarmup",
    "LinearASSoftmaxLoss",
    "LossAccuracyCorrelation",
    "MarginAnnealing",
    "MaskedSampleRatio",
    "MultiLabelASSoftmaxLoss",
    "PredictionWriter",
    "SkipMaskedSamples",
    "__version__",
    "build_loss",
    "classifier_head",
]
