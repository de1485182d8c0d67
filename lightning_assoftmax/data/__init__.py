"""Ready-made ``LightningDataModule``s that work offline (one per file)."""

from lightning_assoftmax.data.bbc_news import BBCNews
from lightning_assoftmax.data.bbc_news_tokens import BBCNewsTokens
from lightning_assoftmax.data.digits import Digits
from lightning_assoftmax.data.text_file import TextFile

__all__ = ["BBCNews", "BBCNewsTokens", "Digits", "TextFile"]
