"""Validation of the family members' hyperparameters (errors name the value and the fix)."""

from __future__ import annotations

import math


def check_real(
    value: float,
    what: str,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
    hint: str = "",
) -> float:
    """Return ``value`` as a float inside the stated interval or raise with the interval named."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if math.isnan(value) or not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"{what} must lie in {interval}, got {value!r}.{' ' + hint if hint else ''}")
    return value


def check_positive_int(value: int, what: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.{' ' + hint if hint else ''}")
    return value
