"""The single-label AS-Softmax loss against an independent slow reference and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_as_softmax, reference_keep_mask

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_keep_mask,
    as_softmax_loss_and_stats,
    masked_sample_ratio,
)

SHAPES = [(7, 5), (3, 150), (4, 6, 9), (2, 11, 3, 4), (1, 1), (5, 2)]


def _target(logits: torch.Tensor, ignore_share: float = 0.3) -> torch.Tensor:
    num_classes = logits.shape[1]
    shape = (logits.shape[0],) + tuple(logits.shape[2:])
    target = torch.randint(num_classes, shape)
    target[torch.rand(shape) < ignore_share] = -100
    return target


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_loss_and_gradient(shape, delta, reduction):
    logits = (torch.randn(shape) * 3).requires_grad_()
    target = _target(logits)
    ours = as_softmax_cross_entropy(logits, target, delta, reduction=reduction)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = reference_as_softmax(ref_logits, target, delta, reduction=reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    weights = torch.rand(ours.shape) if reduction == "none" else torch.tensor(1.7)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_custom_ignore_index(ignore_index):
    logits = torch.randn(20, 5, requires_grad=True)
    target = torch.randint(5, (20,))
    ours = as_softmax_cross_entropy(logits, target, 0.1, ignore_index=ignore_index, reduction="none")
    ref = reference_as_softmax(logits.detach(), target, 0.1, ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(ours, ref)
    assert torch.all(ours[target == ignore_index] == 0)
    ours.sum().backward()
    assert torch.all(logits.grad[target == ignore_index] == 0)


def test_delta_one_equals_cross_entropy():
    logits = torch.randn(64, 10, requires_grad=True)
    target = torch.randint(10, (64,))
    target[::7] = -100
    ours = as_softmax_cross_entropy(logits, target, delta=1.0)
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(ours, ce)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ce, = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(g_ours, g_ce)


def test_hand_computed_cases():
    # p = softmax([4, 0, 0]) = [0.9647, 0.0177, 0.0177]: target 0 beats both by > 0.1 -> masked.
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.8, 0.0]], requires_grad=True)
    target = torch.tensor([0, 0])
    loss = as_softmax_cross_entropy(logits, target, delta=0.1, reduction="none")
    # Row 2: p = [0.4640, 0.3799, 0.1561]; class 1 kept (0.084 <= 0.1), class 2 masked (0.308).
    expected_row2 = math.log(math.exp(1.0) + math.exp(0.8)) - 1.0
    assert loss[0].item() == 0.0
    assert loss[1].item() == pytest.approx(expected_row2, rel=1e-6)
    loss.sum().backward()
    assert torch.all(logits.grad[0] == 0)
    p_kept = math.exp(1.0) / (math.exp(1.0) + math.exp(0.8))
    torch.testing.assert_close(logits.grad[1], torch.tensor([p_kept - 1, 1 - p_kept, 0.0]))


def test_delta_zero_keeps_classes_at_least_as_probable():
    logits = torch.tensor([[2.0, 2.0, 1.0, 3.0]])
    keep = as_softmax_keep_mask(logits, torch.tensor([0]), delta=0.0)
    assert keep.tolist() == [[True, True, False, True]]


def test_keep_mask_matches_reference_and_layout():
    logits = torch.randn(3, 7, 4, 5)
    target = _target(logits)
    keep = as_softmax_keep_mask(logits, target, 0.1)
    assert keep.shape == logits.shape and keep.dtype == torch.bool
    rows = logits.movedim(1, -1).reshape(-1, 7)
    flat = target.reshape(-1)
    valid = flat != -100
    expected = torch.zeros_like(rows, dtype=torch.bool)
    expected[valid] = reference_keep_mask(rows[valid], flat[valid], 0.1)
    assert torch.equal(keep.movedim(1, -1).reshape(-1, 7), expected)


def test_masked_sample_ratio_counts_exact_zero_rows_and_excludes_ignored():
    logits = torch.tensor([[5.0, 0.0], [0.0, 0.1], [0.0, 9.0], [3.0, 0.0]])
    target = torch.tensor([0, 1, -100, 1])
    # row 0 masked, row 1 not (close call), row 2 ignored, row 3 wrong -> 1 / 3
    assert masked_sample_ratio(logits, target, 0.1).item() == pytest.approx(1 / 3)
    assert masked_sample_ratio(logits, torch.full((4,), -100), 0.1).item() == 0.0


def test_a_masked_sample_is_decided_by_the_keep_rule_not_by_a_zero_loss():
    # Row 0 is confident: in float64 p_t = 1 / (1 + 2 e^-30), p_i = e^-30 p_t (about 9.4e-14), so
    # the cross entropy is log(1 + 2 e^-30), about 1.9e-13 > 0, which float32 rounds to exactly 0.
    # Row 1 is a close call (p = [0.464, 0.380, 0.156]).
    logits64 = torch.tensor([[30.0, 0.0, 0.0], [1.0, 0.8, 0.0]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    p64 = torch.softmax(logits64, 1)
    assert 0 < F.cross_entropy(logits64[:1], target[:1]).item() < 1e-12
    logits = logits64.float().requires_grad_()
    assert F.cross_entropy(logits[:1].detach(), target[:1]).item() == 0.0
    # delta = 1 keeps every class (p_t - p_i <= 1): no row is masked, and the loss and gradient
    # are the cross entropy's, including row 0's non-zero gradient on the other classes.
    loss, masked, valid = as_softmax_loss_and_stats(logits, target, 1.0, reduction="none")
    assert (masked.item(), valid.item()) == (0, 2)
    assert masked_sample_ratio(logits, target, 1.0).item() == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    expected = p64 - F.one_hot(target, 3)
    torch.testing.assert_close(grad, expected.float(), rtol=1e-6, atol=1e-7)
    assert grad[0, 1].item() == pytest.approx(p64[0, 1].item(), rel=1e-5)  # about 9.4e-14, not 0
    # delta = 0.1: row 0 keeps only its target (p_t - p_i is about 1 > 0.1): masked, with an
    # exact zero loss and gradient; row 1 keeps classes 0 and 1 (0.464 - 0.380 <= 0.1).
    loss, masked, valid = as_softmax_loss_and_stats(logits, target, 0.1, reduction="none")
    assert (masked.item(), valid.item()) == (1, 2)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert loss[0].item() == 0.0 and torch.all(grad[0] == 0)
    kept = p64[1, :2] / p64[1, :2].sum()
    torch.testing.assert_close(grad[1], torch.cat([kept - torch.tensor([1.0, 0.0]), torch.zeros(1)]).float())


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.full((4,), -100)
    for reduction in ("mean", "sum"):
        loss = as_softmax_cross_entropy(logits, target, reduction=reduction)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad == 0)
    assert torch.all(as_softmax_cross_entropy(logits, target, reduction="none") == 0)


def test_empty_batch():
    logits = torch.randn(0, 4, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    loss = as_softmax_cross_entropy(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 4)
    assert as_softmax_cross_entropy(logits, target, reduction="none").shape == (0,)
    assert masked_sample_ratio(logits, target).item() == 0.0


def test_nan_rows_surface_and_are_not_masked():
    logits = torch.tensor([[float("nan"), 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, float("inf"), 0.0]])
    target = torch.tensor([0, 0, 0])
    loss = as_softmax_cross_entropy(logits, target, 0.1, reduction="none")
    assert math.isnan(loss[0].item())
    assert loss[1].item() == 0.0
    assert not math.isfinite(loss[2].item())
    assert math.isnan(as_softmax_cross_entropy(logits, target, 0.1).item())
    _, masked, valid = as_softmax_loss_and_stats(logits, target, 0.1)
    assert (masked.item(), valid.item()) == (1, 3)
    # NaN in a class that would be masked must still surface (never hidden as 0).
    other = torch.tensor([[9.0, 0.0, float("nan")]])
    assert math.isnan(as_softmax_cross_entropy(other, torch.tensor([0])).item())
    # C = 1: a NaN row is not a masked sample even though only the target exists.
    single = torch.tensor([[float("nan")], [2.0]])
    assert masked_sample_ratio(single, torch.tensor([0, 0])).item() == 0.5


def test_negative_infinity_logits_are_fine():
    logits = torch.tensor([[2.0, float("-inf"), 1.9], [5.0, float("-inf"), float("-inf")]], requires_grad=True)
    target = torch.tensor([0, 0])
    loss = as_softmax_cross_entropy(logits, target, 0.1, reduction="none")
    ref = reference_as_softmax(logits.detach(), target, 0.1, reduction="none")
    torch.testing.assert_close(loss, ref)
    assert loss[1].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[:, 1] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decides_in_float32(dtype):
    logits = (torch.randn(32, 12) * 4).to(dtype).requires_grad_()
    target = torch.randint(12, (32,))
    loss = as_softmax_cross_entropy(logits, target, 0.1, reduction="none")
    assert loss.dtype == torch.float32
    ref = reference_as_softmax(logits.detach().float(), target, 0.1, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.mean().backward()
    assert logits.grad.dtype == dtype
    ref_logits = logits.detach().float().requires_grad_()
    reference_as_softmax(ref_logits, target, 0.1).backward()
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=2e-2, atol=2e-3)


def test_gradcheck_float64():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, -100, 4, 3])
    for delta in (0.0, 0.1, 0.3, 1.0):
        assert torch.autograd.gradcheck(
            lambda z, d=delta: as_softmax_cross_entropy(z, target, d, reduction="none"), (logits,)
        )
    channel_second = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([[0, 1, 3], [2, -100, 0]])
    assert torch.autograd.gradcheck(lambda z: as_softmax_cross_entropy(z, t2, 0.2), (channel_second,))


def test_inputs_are_not_modified():
    logits = torch.randn(8, 6, requires_grad=True)
    target = torch.randint(6, (8,))
    before = logits.detach().clone()
    as_softmax_cross_entropy(logits, target).backward()
    as_softmax_keep_mask(logits, target)
    assert torch.equal(logits.detach(), before)


def test_single_vector_logits_like_cross_entropy():
    logits = torch.tensor([0.3, 2.0, -1.0])
    target = torch.tensor(1)
    torch.testing.assert_close(as_softmax_cross_entropy(logits, target, 1.0), F.cross_entropy(logits, target))


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------------
@st.composite
def batches(draw, max_abs=5.0):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 8))
    values = draw(
        st.lists(st.floats(-max_abs, max_abs, allow_nan=False, width=32), min_size=n * c, max_size=n * c)
    )
    target = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(n, c), torch.tensor(target)


@settings(max_examples=200, deadline=None)
@given(batches(max_abs=1e4), st.floats(0.0, 1.0))
def test_property_between_zero_and_cross_entropy(batch, delta):
    logits, target = batch
    loss = as_softmax_cross_entropy(logits, target, delta, reduction="none")
    ce = F.cross_entropy(logits, target, reduction="none")
    assert torch.all(loss >= 0)
    assert torch.all(loss <= ce + 1e-5 * (1 + ce.abs()))


@settings(max_examples=200, deadline=None)
@given(batches(max_abs=50.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_property_monotone_in_delta(batch, d1, d2):
    logits, target = batch
    low, high = sorted((d1, d2))
    loss_low = as_softmax_cross_entropy(logits, target, low, reduction="none")
    loss_high = as_softmax_cross_entropy(logits, target, high, reduction="none")
    assert torch.all(loss_low <= loss_high + 1e-6 * (1 + loss_high.abs()))


@settings(max_examples=200, deadline=None)
@given(batches(max_abs=5.0), st.floats(0.0, 1.0))
def test_property_masked_iff_zero_loss_iff_target_alone(batch, delta):
    # Moderate logits: every exp(z_i - max) is far above float32 rounding, so "only the target is
    # kept" (from the reference mask) must coincide with an exact zero loss and zero gradient.
    logits, target = batch
    logits.requires_grad_()
    loss = as_softmax_cross_entropy(logits, target, delta, reduction="none")
    alone = reference_keep_mask(logits.detach(), target, delta).sum(dim=1) == 1
    assert torch.equal(loss == 0, alone)
    _, masked, valid = as_softmax_loss_and_stats(logits, target, delta)
    assert masked.item() == int(alone.sum()) and valid.item() == len(target)
    loss.sum().backward()
    assert torch.all(logits.grad[alone] == 0)


@pytest.mark.parametrize("delta", [0.1, 1.0])
def test_loss_and_gradient_where_the_target_probability_underflows(delta):
    """A row whose p_t underflows float32 (its log p_t comes from the logits) beside ordinary and
    masked rows: value and gradient against the float64 formula."""
    z = torch.tensor([[0.0, -200.0, 1.0], [3.0, 0.0, 0.0], [0.5, 0.2, -0.1]], requires_grad=True)
    t = torch.tensor([1, 0, 2])
    loss = as_softmax_cross_entropy(z, t, delta, reduction="none")
    z64 = z.detach().double().requires_grad_()
    p = z64.softmax(1)
    p_t = p.gather(1, t[:, None])
    keep = (p_t - p <= delta) | (torch.arange(3)[None] == t[:, None])
    ref = torch.logsumexp(z64.masked_fill(~keep, float("-inf")), 1) - z64.gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)
