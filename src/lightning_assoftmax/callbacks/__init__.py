"""Lightning callbacks of the bundle (one per file, named for what it does)."""

from lightning_assoftmax.callbacks.adaptive_grad_accumulation import AdaptiveGradAccumulation
from lightning_assoftmax.callbacks.delta_warmup import DeltaWarmup

__all__ = ["DeltaWarmup"]
__all__ += ["AdaptiveGradAccumulation"]
