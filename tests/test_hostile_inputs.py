"""Hostile inputs (property-based): extreme logits, ties, tiny class counts, half precision, NaN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_keep_mask

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_loss_and_stats,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SPECIAL = [0.0, 1e4, -1e4, 1.0, -1.0, 30.0, -30.0]


@st.composite
def hostile_batches(draw):
    n = draw(st.integers(0, 6))
    c = draw(st.sampled_from([1, 2, 3, 7]))
    dtype = draw(st.sampled_from(DTYPES))
    element = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, allow_nan=False, width=16))
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
    assert masked.item() == int((loss == 0).sum()) and count.item() == logits.shape[0]
