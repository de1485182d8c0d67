"""Ready-made ``LightningDataModule``s that work offline (one per file)."""

from lightning_assoftmax.data.banking77 import Banking77
from lightning_assoftmax.data.bbc_news import BBCNews
from lightning_assoftmax.data.bbc_news_tokens import BBCNewsTokens
from lightning_assoftmax.data.clinc150 import CLINC150
from lightning_assoftmax.data.dbpedia219 import DBpedia219
from lightning_assoftmax.data.digits import Digits
from lightning_assoftmax.data.hwu64 import HWU64
from lightning_assoftmax.data.text_file import TextFile

__all__ = ["BBCNews", "BBCNewsTokens", "Banking77", "CLINC150", "DBpedia219", "Digits", "HWU64", "TextFile"]
