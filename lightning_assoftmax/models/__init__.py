"""Ready-made ``LightningModule``s with the AS-Softmax loss (one per file)."""

from lightning_assoftmax.models.image_classifier import ImageClassifier
from lightning_assoftmax.models.text_classifier import TextClassifier
from lightning_assoftmax.models.token_classifier import TokenClassifier

__all__ = ["ImageClassifier", "TextClassifier", "TokenClassifier"]
