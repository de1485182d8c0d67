"""Multi-label AS-Softmax against a row-by-row reference and the SPEC's edge rows."""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference_multilabel

from lightning_assoftmax import MultiLabelASSoftmaxLoss
from lightning_assoftmax.functional import (
    multilabel_as_softmax_keep_mask,
    multilabel_as_softmax_loss,
    multilabel_masked_sample_ratio,
)


def _base(s, y):
    """The unmasked base loss by its formula."""
    neg = sum(math.exp(v) for v, t in zip(s, y, strict=True) if t == 0)
    pos = sum(math.exp(-v) for v, t in zip(s, y, strict=True) if t == 1)
    return math.log1p(neg) + math.log1p(pos)


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(9, 6), (4, 30), (3, 2)])
def test_matches_reference_loss_and_gradient(delta, shape):
    logits = (torch.randn(shape) * 2).requires_grad_()
    target = (torch.rand(shape) < 0.3).long()
    target[0] = 0  # a row without positives
    target[1] = 1  # a row without negatives
    ours = multilabel_as_softmax_loss(logits, target, delta, reduction="none")
    ref_logits = logits.detach().clone().requires_grad_()
    ref = reference_multilabel(ref_logits, target, delta)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    w = torch.rand(shape[0])
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_delta_one_is_the_base_loss():
    s = [0.3, -1.2, 2.0, 0.0]
    y = [1, 0, 1, 0]
    loss = multilabel_as_softmax_loss(torch.tensor([s]), torch.tensor([y]), 1.0)
    assert loss.item() == pytest.approx(_base(s, y), rel=1e-6)


def test_hand_computed_masking():
    # p = softmax([0.5, 0, -0.5]) = [0.5065, 0.3072, 0.1863]; positives {0, 1}, negative {2}.
    logits = torch.tensor([[0.5, 0.0, -0.5]])
    target = torch.tensor([[1, 1, 0]])
    # delta 0.2: negative kept (0.3072-0.1863=0.121 <= 0.2); positive 0 masked (0.320 > 0.2),
    # positive 1 kept (0.121 <= 0.2).
    keep = multilabel_as_softmax_keep_mask(logits, target, 0.2)
    assert keep.tolist() == [[False, True, True]]
    expected = math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.0))
    assert multilabel_as_softmax_loss(logits, target, 0.2).item() == pytest.approx(expected, rel=1e-6)
    # delta 0.1: every term masked -> exactly 0, a masked sample.
    assert multilabel_as_softmax_loss(logits, target, 0.1).item() == 0.0
    assert multilabel_masked_sample_ratio(logits, target, 0.1).item() == 1.0


def test_rows_without_positives_or_negatives_keep_their_side():
    logits = torch.tensor([[3.0, -4.0, -4.0], [4.0, 4.0, -1.0]])
    no_pos = torch.tensor([[0, 0, 0], [1, 1, 1]])
    loss = multilabel_as_softmax_loss(logits, no_pos, 0.1, reduction="none")
    # Row 0 has no positives: all negatives stay (the reference code would give 0 here).
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(3) + 2 * math.exp(-4)), rel=1e-6)
    # Row 1 has no negatives: all positives stay.
    assert loss[1].item() == pytest.approx(math.log1p(2 * math.exp(-4) + math.exp(1)), rel=1e-6)
    assert loss.gt(0).all()


def test_confident_row_is_exactly_zero_with_zero_gradient():
    logits = torch.tensor([[6.0, -6.0, 5.5, -7.0]], requires_grad=True)
    target = torch.tensor([[1, 0, 1, 0]])
    loss = multilabel_as_softmax_loss(logits, target, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_a_masked_sample_keeps_no_term_whatever_its_loss_value():
    # p = softmax([30, -30]) = [1 - e^-60, e^-60]. In float64 the base loss is
    # 2 log(1 + e^-30), about 1.9e-13 > 0, which float32 rounds to exactly 0.
    logits64 = torch.tensor([[30.0, -30.0]], dtype=torch.float64)
    target = torch.tensor([[1, 0]])
    assert 0 < _base(logits64[0].tolist(), target[0].tolist()) < 1e-12
    logits = logits64.float().requires_grad_()
    # delta = 1 keeps both terms (1 - e^-60 <= 1): not masked, and the gradient is the base
    # loss's, -+e^-30 / (1 + e^-30) (about 9.4e-14), not zero.
    loss = multilabel_as_softmax_loss(logits, target, 1.0, reduction="none")
    assert loss.item() == 0.0
    assert multilabel_masked_sample_ratio(logits, target, 1.0).item() == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    slope = math.exp(-30) / (1 + math.exp(-30))
    torch.testing.assert_close(grad, torch.tensor([[-slope, slope]]), rtol=1e-5, atol=0.0)
    # delta = 0.1 drops both (1 - e^-60 > 0.1): a masked sample, with an exact zero gradient.
    loss = multilabel_as_softmax_loss(logits, target, 0.1, reduction="none")
    assert multilabel_masked_sample_ratio(logits, target, 0.1).item() == 1.0
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_nan_row_surfaces_and_is_not_masked():
    logits = torch.tensor([[float("nan"), -9.0, -9.0], [9.0, -9.0, -9.0]])
    target = torch.tensor([[1, 0, 0], [1, 0, 0]])
    loss = multilabel_as_softmax_loss(logits, target, 0.1, reduction="none")
    assert math.isnan(loss[0].item()) and loss[1].item() == 0.0
    assert multilabel_masked_sample_ratio(logits, target, 0.1).item() == 0.5


def test_bool_and_float_targets_and_reductions():
    logits = torch.randn(5, 4)
    target = torch.rand(5, 4) < 0.5
    none = multilabel_as_softmax_loss(logits, target, 0.1, reduction="none")
    torch.testing.assert_close(multilabel_as_softmax_loss(logits, target.float(), 0.1, reduction="none"), none)
    torch.testing.assert_close(multilabel_as_softmax_loss(logits, target, 0.1, reduction="sum"), none.sum())
    torch.testing.assert_close(MultiLabelASSoftmaxLoss(0.1)(logits, target), none.mean())


def test_gradcheck_float64():
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda z: multilabel_as_softmax_loss(z, target, 0.1, reduction="none"), (logits,))


def test_half_precision():
    logits = (torch.randn(6, 8) * 3).to(torch.bfloat16)
    target = (torch.rand(6, 8) < 0.3).long()
    loss = multilabel_as_softmax_loss(logits, target, 0.1, reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference_multilabel(logits.float(), target, 0.1))
