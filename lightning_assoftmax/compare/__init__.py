"""Does a softmax variant help on *this* model and data? A paired grid of fits.

Each *arm* (a ``build_loss`` name, its keywords, callbacks of its own) trains once per seed; arms
of a seed share the seed, the data order and (same architecture) the initial weights, and are
compared with the first arm, the baseline, seed by seed. The command line is
``lightning-assoftmax compare`` (see ``docs/compare.md``); from Python, :class:`CompareGrid` with
a factory that builds one fit, and :func:`run_compare`.
"""

from lightning_assoftmax.compare.api import CompareResult, run_compare
from lightning_assoftmax.compare.arms import Arm, CallbackSpec, parse_arms
from lightning_assoftmax.compare.grid import CompareGrid, FitSetup, read_journals
from lightning_assoftmax.compare.stats import holm, paired_difference, summarize

__all__ = [
    "Arm",
    "CallbackSpec",
    "CompareGrid",
    "CompareResult",
    "FitSetup",
    "holm",
    "paired_difference",
    "parse_arms",
    "read_journals",
    "run_compare",
    "summarize",
]
