"""Lightning callbacks of the bundle (one per file, named for what it does)."""

from lightning_assoftmax.callbacks.adaptive_grad_accumulation import AdaptiveGradAccumulation
from lightning_assoftmax.callbacks.delta_warmup import DeltaWarmup
from lightning_assoftmax.callbacks.loss_accuracy_correlation import LossAccuracyCorrelation
from lightning_assoftmax.callbacks.margin_annealing import MarginAnnealing
from lightning_assoftmax.callbacks.prediction_writer import PredictionWriter
from lightning_assoftmax.callbacks.progress_bar import CompactProgressBar
from lightning_assoftmax.callbacks.skip_masked_samples import SkipMaskedSamples

__all__ = [
    "AdaptiveGradAccumulation",
    "CompactProgressBar",
    "DeltaWarmup",
    "LossAccuracyCorrelation",
    "MarginAnnealing",
    "PredictionWriter",
    "SkipMaskedSamples",
]
