"""Every bad input of SPEC section 2 raises early with a message naming the value and the fix."""

from __future__ import annotations

import pytest
import torch

from lightning_assoftmax import ASSoftmaxLoss, MaskedSampleRatio, MultiLabelASSoftmaxLoss
from lightning_assoftmax.functional import (
    accumulation_steps,
    as_softmax_cross_entropy,
    as_softmax_keep_mask,
    masked_sample_ratio,
    multilabel_as_softmax_loss,
)

LOGITS = torch.randn(4, 3)


@pytest.mark.parametrize(
    ("target", "error", "pattern"),
    [
        (torch.tensor([0, 1, 3, 0]), ValueError, r"class index 3, outside \[0, 2\]"),
        (torch.tensor([0, -1, 2, 0]), ValueError, r"class index -1"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), TypeError, r"integer class indices.*torch.float32.*target.long\(\)"),
        (torch.tensor([0, 1, 2]), ValueError, r"target shape \(3,\) does not match logits shape \(4, 3\)"),
        (torch.zeros(4, 3, dtype=torch.long), ValueError, r"expected target shape \(4,\)"),
    ],
)
def test_bad_targets(target, error, pattern):
    for fn in (as_softmax_cross_entropy, as_softmax_keep_mask, masked_sample_ratio):
        with pytest.raises(error, match=pattern):
            fn(LOGITS, target)


def test_token_layout_hint():
    with pytest.raises(ValueError, match=r"transpose\(1, 2\)"):
        as_softmax_cross_entropy(torch.randn(2, 7, 30), torch.zeros(2, 7, dtype=torch.long))


@pytest.mark.parametrize("delta", [-0.1, 1.5, float("nan"), 2])
def test_bad_delta(delta):
    target = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\], got"):
        as_softmax_cross_entropy(LOGITS, target, delta)
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\]"):
        ASSoftmaxLoss(delta=delta)
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\]"):
        MaskedSampleRatio(delta=delta)


def test_delta_type():
    with pytest.raises(TypeError, match="delta must be a number"):
        as_softmax_cross_entropy(LOGITS, torch.tensor([0, 1, 2, 0]), "0.1")


def test_bad_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        as_softmax_cross_entropy(LOGITS, torch.tensor([0, 1, 2, 0]), reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        multilabel_as_softmax_loss(LOGITS, torch.zeros(4, 3), reduction="avg")


def test_integer_logits():
    with pytest.raises(TypeError, match="floating-point"):
        as_softmax_cross_entropy(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))


def test_multilabel_shape_and_values():
    with pytest.raises(ValueError, match=r"multi-label target shape \(4,\) must equal the logits shape \(4, 3\)"):
        multilabel_as_softmax_loss(LOGITS, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="only 0 and 1, found 0.7"):
        MultiLabelASSoftmaxLoss()(LOGITS, torch.full((4, 3), 0.7))


def test_accumulation_rule_arguments():
    with pytest.raises(ValueError, match="lam must be a positive"):
        accumulation_steps(0.5, lam=0)
    with pytest.raises(ValueError, match="masked_ratio must be a number in"):
        accumulation_steps(float("nan"))
    with pytest.raises(ValueError, match="masked_ratio must be a number in"):
        accumulation_steps(-0.2)


def test_error_loses_nothing():
    logits = torch.randn(4, 3, requires_grad=True)
    before = logits.detach().clone()
    with pytest.raises(ValueError):
        as_softmax_cross_entropy(logits, torch.tensor([0, 1, 5, 0]))
    assert torch.equal(logits.detach(), before) and logits.grad is None
