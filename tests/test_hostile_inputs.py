"""Hostile inputs (property-based): extreme logits, ties, tiny class counts, half precision, NaN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_keep_mask, reference_multilabel

from lightning_assoftmax import MaskedSampleRatio
from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_loss_and_stats,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SPECIAL = [0.0, 1e4, -1e4, 1.0, -1.0, 30.0, -30.0]


@st.composite
def hostile_batches(draw, moderate: bool = False):
    n = draw(st.integers(0, 6))
    c = draw(st.sampled_from([1, 2, 3, 7]))
    dtype = draw(st.sampled_from(DTYPES))
    element = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, allow_nan=False, width=16))
    if moderate:  # every exp(z_i - max) far above float32 rounding: zero loss <=> target alone
        element = st.floats(-5.0, 5.0, width=16)
    tie_row = draw(st.booleans())
    values = draw(st.lists(element, min_size=n * c, max_size=n * c))
    logits = torch.tensor(values, dtype=torch.float64).reshape(n, c)
    if tie_row and n:
        logits[0] = logits[0, 0]  # an all-equal row
    target = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=torch.long)
    ignore = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    target = target.masked_fill(ignore, -100)
    return logits.to(dtype), target


@settings(max_examples=300, deadline=None)
@given(hostile_batches(), st.floats(0.0, 1.0))
def test_loss_is_finite_nonnegative_and_below_cross_entropy(batch, delta):
    logits, target = batch
    loss = as_softmax_cross_entropy(logits, target, delta, reduction="none")
    ce = F.cross_entropy(logits.double(), target, reduction="none")
    assert loss.shape == target.shape
    assert torch.isfinite(loss).all()
    assert (loss >= 0).all()
    assert (loss.double() <= ce + 1e-4 * (1 + ce)).all()
    assert (loss[target == -100] == 0).all()
    mean = as_softmax_cross_entropy(logits, target, delta)
    assert math.isfinite(mean.item()) and mean.item() >= 0
    _, masked, valid = as_softmax_loss_and_stats(logits, target, delta)
    assert 0 <= masked.item() <= valid.item() == int((target != -100).sum())


@settings(max_examples=200, deadline=None)
@given(hostile_batches(), st.floats(0.0, 1.0))
def test_gradients_are_finite_and_zero_on_ignored_and_masked_rows(batch, delta):
    logits, target = batch
    logits = logits.clone().requires_grad_()
    loss = as_softmax_cross_entropy(logits, target, delta, reduction="none")
    loss.sum().backward()
    grad = logits.grad
    assert grad.dtype == logits.dtype
    assert torch.isfinite(grad.float()).all()
    assert (grad[target == -100] == 0).all()
    # Masked rows (only the target kept) have exactly zero gradient. A zero loss alone does not
    # imply it: with delta=1, as for F.cross_entropy, log(1 + 1e-13) rounds to 0 in float32.
    valid = target != -100
    if valid.any():
        keep = reference_keep_mask(logits.detach()[valid].float(), target[valid], delta)
        alone = keep.sum(dim=1) == 1
        assert (grad[valid][alone] == 0).all()


@settings(max_examples=100, deadline=None)
@given(hostile_batches(), st.integers(0, 6))
def test_nan_rows_surface_and_are_never_masked(batch, col):
    logits, target = batch
    if logits.shape[0] == 0:
        return
    logits = logits.clone()
    logits[0, col % logits.shape[1]] = float("nan")
    target = target.clone()
    target[0] = 0
    loss = as_softmax_cross_entropy(logits, target, 0.1, reduction="none")
    assert math.isnan(loss[0].item())
    _, masked, _ = as_softmax_loss_and_stats(logits, target, 0.1)
    _, masked_without, _ = as_softmax_loss_and_stats(logits[1:], target[1:], 0.1)
    assert masked.item() == masked_without.item()
    # The NaN stays in its row: the other rows' losses are those of a batch without it.
    alone = as_softmax_cross_entropy(logits[1:], target[1:], 0.1, reduction="none")
    torch.testing.assert_close(loss[1:], alone, rtol=1e-6, atol=0.0)


@settings(max_examples=200, deadline=None)
@given(hostile_batches(), st.floats(0.0, 1.0))
def test_multilabel_hostile(batch, delta):
    logits, target = batch
    labels = torch.zeros(logits.shape, dtype=torch.long)
    if logits.numel():
        labels = (logits.float() > logits.float().mean()).long()
    loss = multilabel_as_softmax_loss(logits, labels, delta, reduction="none")
    base = multilabel_as_softmax_loss(logits.double(), labels, 1.0, reduction="none")
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    assert (loss.double() <= base + 1e-4 * (1 + base)).all()
    _, masked, count = multilabel_as_softmax_loss_and_stats(logits, labels, delta)
    assert masked.item() == int(all_terms_masked(logits, labels, delta).sum())
    assert count.item() == logits.shape[0]


# -- multi-label: labels drawn independently of the scores -------------------------------------------
@st.composite
def hostile_multilabel(draw):
    """Hostile scores with 0/1 labels drawn on their own: rows without positives, without
    negatives, a single label (C = 1), ties and +-1e4 scores."""
    logits, _ = draw(hostile_batches())
    bits = draw(st.lists(st.booleans(), min_size=logits.numel(), max_size=logits.numel()))
    labels = torch.tensor(bits, dtype=torch.long).reshape(logits.shape)
    if logits.shape[0] >= 2:
        labels[0] = 0
        labels[1] = 1
    return logits, labels


def all_terms_masked(logits: torch.Tensor, labels: torch.Tensor, delta: float) -> torch.Tensor:
    """Rows with positives and negatives whose every term is dropped by the SPEC's keep rules."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32  # as the SPEC
    p = torch.softmax(logits.to(compute), dim=1)
    pos, neg = labels.bool(), ~labels.bool()
    two_sided = pos.any(dim=1) & neg.any(dim=1)
    min_pos = p.masked_fill(neg, float("inf")).amin(dim=1, keepdim=True)
    max_neg = p.masked_fill(pos, float("-inf")).amax(dim=1, keepdim=True)
    kept = (neg & (min_pos - p <= delta)) | (pos & (p - max_neg <= delta))
    return two_sided & ~kept.any(dim=1)


@settings(max_examples=100, deadline=None)
@given(hostile_multilabel(), st.floats(0.0, 1.0))
def test_multilabel_independent_labels_finite_bounded_and_masked_rows_have_zero_gradient(batch, delta):
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    loss = multilabel_as_softmax_loss(logits, labels, delta, reduction="none")
    base = reference_multilabel(logits.detach().double(), labels, 1.0)
    assert loss.shape == (logits.shape[0],)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    assert (loss.double() <= base + 1e-4 * (1 + base)).all()
    # Rows without positives or without negatives keep their whole side: the base loss, unmasked.
    one_sided = (labels.sum(dim=1) == 0) | (labels.sum(dim=1) == labels.shape[1])
    torch.testing.assert_close(loss.detach()[one_sided].double(), base[one_sided], rtol=1e-4, atol=1e-5)
    _, masked, count = multilabel_as_softmax_loss_and_stats(logits.detach(), labels, delta)
    assert masked.item() == int(all_terms_masked(logits.detach(), labels, delta).sum())
    assert count.item() == logits.shape[0]
    loss.sum().backward()
    assert torch.isfinite(logits.grad.float()).all()
    # Rows whose every term is masked (SPEC, restated here) have loss and gradient exactly 0. A zero
    # loss alone does not imply it: log(1 + e^-30) rounds to 0 in float32.
    every_term_masked = all_terms_masked(logits.detach(), labels, delta)
    assert (loss.detach()[every_term_masked] == 0).all()
    assert (logits.grad[every_term_masked] == 0).all()


@settings(max_examples=60, deadline=None)
@given(hostile_multilabel(), st.integers(0, 6), st.sampled_from(["nan", "+inf negative", "-inf positive"]))
def test_multilabel_nan_and_wrong_side_infinite_rows_surface_and_are_never_masked(batch, col, bad):
    logits, labels = batch
    if logits.shape[0] == 0:
        return
    logits, labels = logits.clone(), labels.clone()
    col %= logits.shape[1]
    if bad == "nan":
        logits[0, col] = float("nan")
    else:  # an infinitely wrong score; on the right side (+inf positive) a zero loss is correct
        logits[0, col] = float("inf") if bad == "+inf negative" else float("-inf")
        labels[0, col] = 0 if bad == "+inf negative" else 1
    loss = multilabel_as_softmax_loss(logits, labels, 0.1, reduction="none")
    assert not math.isfinite(loss[0].item())
    _, masked, count = multilabel_as_softmax_loss_and_stats(logits, labels, 0.1)
    _, masked_without, _ = multilabel_as_softmax_loss_and_stats(logits[1:], labels[1:], 0.1)
    assert masked.item() == masked_without.item() and count.item() == logits.shape[0]
    alone = multilabel_as_softmax_loss(logits[1:], labels[1:], 0.1, reduction="none")
    torch.testing.assert_close(loss[1:], alone, rtol=1e-6, atol=0.0)


def test_a_nan_row_does_not_reach_rows_that_need_the_exact_path():
    # Rows with a huge logit gap take an exact recomputation inside the loss; a NaN elsewhere in
    # the batch once hid them from it, turning a finite loss into inf (single-label) or NaN
    # (multi-label).
    nan = float("nan")
    logits = torch.tensor([[nan, 0.0], [1e4, -1e4]], requires_grad=True)
    target = torch.tensor([0, 1])
    loss = as_softmax_cross_entropy(logits, target, 0.1, reduction="none")
    assert math.isnan(loss[0].item()) and loss[1].item() == 2e4  # logsumexp(z) - z_t
    loss[1].backward()
    torch.testing.assert_close(logits.grad[1], torch.tensor([1.0, -1.0]))
    scores = torch.tensor([[nan], [1e4], [-1e4]], requires_grad=True)
    labels = torch.tensor([[0], [1], [0]])
    rows = multilabel_as_softmax_loss(scores, labels, 0.1, reduction="none")
    assert math.isnan(rows[0].item()) and rows[1:].tolist() == [0.0, 0.0]  # log(1 + e^-1e4)
    # One-sided rows keep their terms (SPEC): not masked, whatever their loss rounds to.
    assert multilabel_as_softmax_loss_and_stats(scores, labels, 0.1)[1].item() == 0
    rows[1:].sum().backward()
    # The true gradient, e^-1e4 / (1 + e^-1e4), underflows; the loss floors exponents at -80.
    assert (scores.grad[1:].abs() <= math.exp(-80)).all()


# -- MaskedSampleRatio over hostile batch sequences -------------------------------------------------
def reference_masked_and_valid(logits: torch.Tensor, target: torch.Tensor, delta: float) -> tuple[int, int]:
    """SPEC: masked = valid rows whose only kept class is the target (exactly zero loss for
    moderate logits), never a row with a NaN or +inf logit."""
    valid = target != -100
    if not valid.any():
        return 0, 0
    rows, t = logits[valid].float(), target[valid]
    alone = reference_keep_mask(rows, t, delta).sum(dim=1) == 1
    finite = ~(torch.isnan(rows).any(dim=1) | (rows == float("inf")).any(dim=1))
    return int((alone & finite).sum()), int(valid.sum())


@settings(max_examples=40, deadline=None)
@given(st.lists(hostile_batches(moderate=True), min_size=1, max_size=4), st.floats(0.0, 1.0), st.booleans())
def test_masked_sample_ratio_pools_counts_over_empty_all_ignored_and_nan_batches(batches, delta, with_nan):
    metric = MaskedSampleRatio(delta=delta)
    masked = valid = 0
    for logits, target in batches:
        if with_nan and logits.shape[0]:
            logits = logits.clone()
            logits[-1, 0] = float("nan")
        metric.update(logits, target)
        m, v = reference_masked_and_valid(logits, target, delta)
        masked, valid = masked + m, valid + v
    value = metric.compute().item()
    assert math.isfinite(value)
    assert value == pytest.approx(masked / valid if valid else 0.0, rel=1e-6)


def test_masked_sample_ratio_of_only_empty_or_all_ignored_batches_is_zero_not_nan():
    metric = MaskedSampleRatio(delta=0.1)
    metric.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert metric.compute().item() == 0.0
    metric.update(torch.randn(5, 3), torch.full((5,), -100))
    assert metric.compute().item() == 0.0
    metric.update(torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, -100]))
    assert metric.compute().item() == 1.0
    tokens = MaskedSampleRatio(delta=0.1)
    tokens.update(torch.randn(2, 3, 0), torch.zeros(2, 0, dtype=torch.long))  # (N, C, L) with L = 0
    assert tokens.compute().item() == 0.0
    labels = MaskedSampleRatio(delta=0.1, multilabel=True)
    labels.update(torch.zeros(0, 4), torch.zeros(0, 4))
    assert labels.compute().item() == 0.0
