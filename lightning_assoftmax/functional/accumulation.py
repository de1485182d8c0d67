"""The AS-Speed rule (SPEC section 3): how many micro-batches one optimizer step should gather."""

from __future__ import annotations

import math
import sys

from torch import Tensor

__all__ = ["accumulation_steps", "next_accumulation_steps"]

#: Returned for ``masked_ratio >= 1``: larger than any cap a caller can set.
UNBOUNDED = sys.maxsize


def accumulation_steps(masked_ratio: float | Tensor, lam: float = 1.0) -> int:
    r"""Wanted number of micro-batches per optimizer step, :math:`\max(1, \mathrm{round}(\lambda / (1 - \rho)))`.

    Rounding is half-to-even (as Python's ``round`` and the reference code), applied to the
    quotient taken to six decimals so that float32 noise in the ratio cannot decide a tie. When every sample is
    masked (``masked_ratio >= 1``) the value is ``sys.maxsize``, above any cap.

    Example:
        >>> accumulation_steps(0.5), accumulation_steps(0.6), accumulation_steps(0.0, lam=0.4)
        (2, 2, 1)
    """
    if isinstance(masked_ratio, Tensor):
        masked_ratio = float(masked_ratio.detach().float().item())
    masked_ratio = float(masked_ratio)
    lam = float(lam)
    if not lam > 0 or math.isinf(lam):
        raise ValueError(f"lam must be a positive finite number, got {lam!r} (the paper uses lam=1).")
    if math.isnan(masked_ratio) or masked_ratio < 0:
        raise ValueError(f"masked_ratio must be a number in [0, 1], got {masked_ratio!r}.")
    if masked_ratio >= 1.0:
        return UNBOUNDED
    wanted = lam / (1.0 - masked_ratio)
    if wanted >= UNBOUNDED:
        return UNBOUNDED
    # Six decimals first, so float32 noise in the ratio (0.6 -> 0.60000002) cannot decide a tie.
    return max(1, round(round(wanted, 6)))


def next_accumulation_steps(masked_ratio: float | Tensor, previous: int, lam: float = 1.0, max_steps: int = 2) -> int:
    """The next window size: never shrinks, grows by at most one, capped at ``max_steps``."""
    wanted = accumulation_steps(masked_ratio, lam)
    return min(max(wanted, previous), previous + 1, max_steps)
