"""Output layers for large label spaces that own the class weights and take hidden states.

:func:`build_head` turns a name into an :class:`OutputHead`: ``dense`` (the full softmax, the
baseline), ``adaptive``, ``class_based``, ``hierarchical``, ``sampled`` and ``nce``. Their saving
comes from never computing most of the ``(N, V)`` scores in training; every head still gives the
exact, normalised ``log_prob`` for evaluation. AS-Softmax (``delta``) is exact on the tree-shaped
heads, which skip the clusters or subtrees it masks whole. Pure PyTorch: nothing here imports
Lightning.
"""

from lightning_assoftmax.heads.adaptive import AdaptiveSoftmaxHead
from lightning_assoftmax.heads.base import OutputHead
from lightning_assoftmax.heads.class_based import ClassBasedSoftmaxHead
from lightning_assoftmax.heads.dense import DenseHead
from lightning_assoftmax.heads.hierarchical import HierarchicalSoftmaxHead
from lightning_assoftmax.heads.nce import NCEHead
from lightning_assoftmax.heads.registry import (
    HEAD_NAMES,
    HEADS,
    build_head,
    check_head_name,
    head_kwarg_names,
)
from lightning_assoftmax.heads.sampled import SampledSoftmaxHead

__all__ = [
    "AdaptiveSoftmaxHead",
    "ClassBasedSoftmaxHead",
    "DenseHead",
    "HEADS",
    "HEAD_NAMES",
    "HierarchicalSoftmaxHead",
    "NCEHead",
    "OutputHead",
    "SampledSoftmaxHead",
    "build_head",
    "check_head_name",
    "head_kwarg_names",
]
