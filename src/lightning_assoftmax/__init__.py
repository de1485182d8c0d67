"""lightning_assoftmax: Adaptive Sparse Softmax (Lv et al., TASLP 2025) for PyTorch Lightning.

Layers, bottom to top: :mod:`.functional` (pure PyTorch math), :mod:`.losses` and :mod:`.metrics`
(modules on it), :mod:`.mixin` and :mod:`.callbacks` (Lightning glue).
"""

from lightning_assoftmax.callbacks import DeltaWarmup
from lightning_assoftmax.callbacks.loss_accuracy_correlation import LossAccuracyCorrelation
from lightning_assoftmax.losses import ASSoftmaxLoss, MultiLabelASSoftmaxLoss
from lightning_assoftmax.metrics import MaskedSampleRatio
from lightning_assoftmax.mixin import ASSoftmaxMixin

__version__ = "0.1.0"

__all__ = [
    "ASSoftmaxLoss",
    "ASSoftmaxMixin",
    "DeltaWarmup",
    "LossAccuracyCorrelation",
    "MaskedSampleRatio",
    "MultiLabelASSoftmaxLoss",
    "__version__",
]
