"""The AS-Speed rule against hand-computed values (SPEC section 3)."""

import sys

import pytest
import torch

from lightning_assoftmax.functional import accumulation_steps, next_accumulation_steps


@pytest.mark.parametrize(
    ("rho", "lam", "expected"),
    [
        (0.0, 1.0, 1),
        (0.3, 1.0, 1),  # 1/0.7 = 1.43 -> 1
        (0.5, 1.0, 2),  # exactly 2
        (0.6, 1.0, 2),  # 2.5 -> 2 (half to even)
        (0.7, 1.0, 3),  # 3.33 -> 3
        (0.8, 1.0, 5),
        (0.0, 0.4, 1),  # 0.4 rounds to 0, floored at 1
        (0.5, 1.25, 2),  # 2.5 -> 2 (half to even)
        (0.5, 1.75, 4),  # 3.5 -> 4 (half to even)
    ],
)
def test_hand_computed(rho, lam, expected):
    assert accumulation_steps(rho, lam) == expected
    assert accumulation_steps(torch.tensor(rho), lam) == expected


def test_all_masked_is_above_any_cap():
    assert accumulation_steps(1.0) == sys.maxsize
    assert next_accumulation_steps(1.0, previous=3, max_steps=10) == 4


def test_next_never_shrinks_grows_by_one_and_is_capped():
    assert next_accumulation_steps(0.0, previous=2, max_steps=4) == 2
    assert next_accumulation_steps(0.9, previous=1, max_steps=4) == 2
    assert next_accumulation_steps(0.9, previous=4, max_steps=4) == 4
    assert next_accumulation_steps(0.5, previous=1, max_steps=1) == 1
