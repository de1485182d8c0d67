"""The AS-Softmax loss ops against slow, independent references written here.

The references follow SPEC section 2 literally: the full softmax, a boolean keep mask, then plain
``F.cross_entropy`` (single-label) or ``logsumexp`` over ``{0} + kept terms`` (multi-label) on
masked logits, in float64, with gradients from autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import saved_bytes

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_keep_mask,
    as_softmax_loss_and_stats,
    masked_sample_ratio,
    multilabel_as_softmax_keep_mask,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)

HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- references


def _decision_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 1:
        return logits.unsqueeze(0)
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def reference_keep(logits, target, delta, ignore_index=-100):
    """Boolean (M, C) keep mask: p_t - p_i <= delta; NaN/+inf rows keep all; ignored rows none."""
    z = _rows(logits.detach()).to(_decision_dtype(logits.dtype))
    t = target.reshape(-1)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    p = torch.softmax(z, dim=1)
    keep = (p.gather(1, safe[:, None]) - p) <= delta
    keep |= p.isnan().any(dim=1, keepdim=True)
    return keep & valid[:, None]


def reference_loss(logits, target, delta, ignore_index=-100, reduction="mean"):
    """Masked ``F.cross_entropy`` in float64; differentiable w.r.t. ``logits``."""
    keep = reference_keep(logits, target, delta, ignore_index)
    t = target.reshape(-1)
    valid = t != ignore_index
    z = _rows(logits).double()
    masked = z.masked_fill(~keep & valid[:, None], float("-inf"))
    loss = F.cross_entropy(masked, t, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def reference_multilabel_keep(logits, target, delta):
    s = _rows(logits.detach()).to(_decision_dtype(logits.dtype))
    pos = _rows(target) > 0.5
    p = torch.softmax(s, dim=1)
    has_pos = pos.any(dim=1, keepdim=True)
    has_neg = (~pos).any(dim=1, keepdim=True)
    min_pos = p.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    max_neg = p.masked_fill(pos, float("-inf")).amax(dim=1, keepdim=True)
    keep_neg = ((min_pos - p) <= delta) | ~has_pos
    keep_pos = ((p - max_neg) <= delta) | ~has_neg
    keep = torch.where(pos, keep_pos, keep_neg)
    return keep | p.isnan().any(dim=1, keepdim=True)


def reference_multilabel_loss(logits, target, delta, reduction="mean"):
    """log(1 + sum_Q e^s) + log(1 + sum_P e^-s) over kept terms, as logsumexp over {0} + terms."""
    keep = reference_multilabel_keep(logits, target, delta)
    pos = _rows(target) > 0.5
    s = _rows(logits).double()
    signed = torch.where(pos, -s, s)
    zero = torch.zeros_like(s[:, :1])
    loss = 0
    for group in (~pos, pos):
        terms = signed.masked_fill(~(keep & group), float("-inf"))
        loss = loss + torch.logsumexp(torch.cat([zero, terms], dim=1), dim=1)
    if reduction == "none":
        return loss.reshape(logits.shape[:1] + logits.shape[2:]) if logits.dim() > 1 else loss[0]
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(loss.shape[0], 1)


# --------------------------------------------------------------------------- data


def single_label_data(shape, num_classes, dtype=torch.float32, seed=0, ignore=0.0, scale=3.0):
    """Logits (N, C, *rest) and targets (N, *rest): a mix of masked, partly and un-masked rows."""
    g = torch.Generator().manual_seed(seed)
    n, rest = shape[0], tuple(shape[1:])
    target = torch.randint(0, num_classes, (n, *rest), generator=g)
    z = torch.randn(n, *rest, num_classes, generator=g, dtype=torch.float64) * scale
    boost = torch.rand(n, *rest, generator=g, dtype=torch.float64) * 4 * scale
    z.scatter_add_(-1, target.unsqueeze(-1), boost.unsqueeze(-1))
    if ignore:
        target[torch.rand(target.shape, generator=g) < ignore] = -100
    return z.movedim(-1, 1).to(dtype).contiguous(), target


def multilabel_data(shape, dtype=torch.float32, seed=0, scale=3.0, rate=0.2):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(shape, generator=g) < rate).float()
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    z += target * torch.rand(shape, generator=g, dtype=torch.float64) * 3 * scale
    return z.to(dtype), target


def tolerances(dtype):
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-9), dict(atol=1e-10, rtol=1e-9)
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5), dict(atol=2e-6, rtol=1e-4)
    # Loss in float32 from exactly representable half inputs; gradient rounded to the half type.
    eps = torch.finfo(dtype).eps
    return dict(atol=2e-5, rtol=2e-5), dict(atol=4 * eps * 0.05, rtol=4 * eps)


def check_against_reference(logits, target, delta, reduction, ignore_index=-100):
    leaf = logits.detach().clone().requires_grad_()
    ref_leaf = logits.detach().clone().requires_grad_()
    loss = as_softmax_cross_entropy(
        leaf, target, delta, ignore_index=ignore_index, reduction=reduction
    )
    expected = reference_loss(ref_leaf, target, delta, ignore_index, reduction)
    loss_tol, grad_tol = tolerances(logits.dtype)
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss.double(), expected, **loss_tol, equal_nan=True)
    weights = torch.rand(
        loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    (grad,) = torch.autograd.grad((loss.double() * weights).sum(), leaf)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), ref_leaf)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(
        grad.double(), expected_grad.to(logits.dtype).double(), **grad_tol, equal_nan=True
    )
    return loss, grad


# --------------------------------------------------------------------------- single-label


@pytest.mark.parametrize(
    ("shape", "num_classes"),
    [
        ((64,), 2),
        ((200,), 5),
        ((100,), 15),
        ((100,), 16),
        ((100,), 150),
        ((37,), 1000),
        ((20000,), 5),  # several column blocks
        ((300,), 700),  # several row blocks
        ((4, 9), 7),  # channel-second, few classes
        ((2, 3, 4), 5),
        ((3, 700), 40),  # channel-second, blocks spanning batch entries
        ((2, 5000), 20),  # channel-second, blocks splitting the length
    ],
)
@pytest.mark.parametrize("delta", [0.0, 0.1, 0.5, 1.0])
def test_matches_reference_float32(shape, num_classes, delta):
    logits, target = single_label_data(shape, num_classes, ignore=0.1)
    for reduction in ("none", "sum", "mean"):
        check_against_reference(logits, target, delta, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("shape", "num_classes"), [((300,), 5), ((120,), 300), ((3, 17), 6), ((2, 33), 40)]
)
def test_matches_reference_across_dtypes(dtype, shape, num_classes):
    logits, target = single_label_data(shape, num_classes, dtype=dtype, ignore=0.1, seed=3)
    for reduction in ("none", "mean"):
        check_against_reference(logits, target, 0.1, reduction)


def test_token_logits_transposed_view():
    """(N, L, C).transpose(1, 2), as for token classification: a non-contiguous input."""
    logits, target = single_label_data((3, 50), 64, seed=5, ignore=0.2)
    token_major = logits.movedim(1, -1).contiguous()
    view = token_major.transpose(1, 2)
    assert not view.is_contiguous()
    check_against_reference(view, target, 0.1, "none")


def test_non_contiguous_two_dimensional_logits():
    logits, target = single_label_data((80,), 30, seed=6)
    check_against_reference(logits.t().contiguous().t(), target, 0.1, "mean")


def test_one_dimensional_logits():
    logits, target = single_label_data((1,), 8, seed=7)
    check_against_reference(logits[0], target[0], 0.1, "none")
    check_against_reference(logits[0], target[0], 0.1, "mean")


@pytest.mark.parametrize("ignore_index", [-100, -1, 255])
def test_ignore_index_patterns(ignore_index):
    logits, target = single_label_data((500,), 10, seed=8)
    for pattern in ("none", "some", "all"):
        t = target.clone()
        if pattern == "some":
            t[::3] = ignore_index
        elif pattern == "all":
            t[:] = ignore_index
        loss, grad = check_against_reference(logits, t, 0.1, "mean", ignore_index=ignore_index)
        ignored = t == ignore_index
        assert torch.all(grad[ignored] == 0)
        if pattern == "all":
            assert loss.item() == 0.0 and not loss.isnan()
            assert torch.all(grad == 0)


def test_masked_rows_have_exact_zero_loss_and_gradient():
    logits = torch.tensor([[9.0, 0.0, 0.0, 0.0], [1.0, 0.9, 0.0, 0.0], [0.0, 30.0, -5.0, 1.0]])
    target = torch.tensor([0, 0, 1])
    leaf = logits.clone().requires_grad_()
    loss, masked, valid = as_softmax_loss_and_stats(leaf, target, 0.1, reduction="none")
    assert loss[0].item() == 0.0 and loss[2].item() == 0.0 and loss[1].item() > 0
    assert masked.item() == 2 and valid.item() == 3
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert torch.all(grad[[0, 2]] == 0)
    # Row 1 keeps classes 0 and 1 (p = 0.378, 0.342) and drops 2 and 3 (p = 0.139).
    assert torch.all(grad[1, :2] != 0) and torch.all(grad[1, 2:] == 0)


def test_delta_one_equals_cross_entropy():
    logits, target = single_label_data((400,), 50, seed=9, ignore=0.2)
    for reduction in ("none", "sum", "mean"):
        leaf = logits.clone().requires_grad_()
        ce_leaf = logits.clone().requires_grad_()
        ours = as_softmax_cross_entropy(leaf, target, 1.0, reduction=reduction)
        ce = F.cross_entropy(ce_leaf, target, reduction=reduction)
        torch.testing.assert_close(ours, ce, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(
            torch.autograd.grad(ours.sum(), leaf)[0],
            torch.autograd.grad(ce.sum(), ce_leaf)[0],
            atol=5e-7,
            rtol=1e-5,
        )


def test_nan_and_inf_rows_surface_and_are_never_masked():
    logits, target = single_label_data((6,), 5, seed=10)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    logits[4, :] = float("nan")
    leaf = logits.clone().requires_grad_()
    loss, masked, valid = as_softmax_loss_and_stats(leaf, target, 0.1, reduction="none")
    bad = torch.tensor([False, True, False, True, True, False])
    assert torch.all(loss[bad].isnan() | loss[bad].isinf())
    assert torch.all(loss[~bad].isfinite())
    reference = reference_loss(logits, target, 0.1, reduction="none")
    assert masked.item() == int((reference[~bad] == 0).sum())
    (grad,) = torch.autograd.grad(loss[~bad].sum(), leaf)
    assert torch.all(grad[~bad].isfinite())
    ratio = masked_sample_ratio(logits, target, 0.1)
    assert ratio.item() == pytest.approx(masked.item() / valid.item())


def test_nan_in_ignored_row_gives_zero_gradient():
    logits, target = single_label_data((5,), 20, seed=11)
    logits[2, 3] = float("nan")
    target[2] = -100
    leaf = logits.clone().requires_grad_()
    loss = as_softmax_cross_entropy(leaf, target, 0.1)
    assert loss.isfinite()
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.all(grad[2] == 0) and torch.all(grad.isfinite())


@pytest.mark.parametrize("num_classes", [6, 40])
def test_minus_inf_logits_are_fine(num_classes):
    logits, target = single_label_data((50,), num_classes, seed=12)
    ruled_out = torch.rand(logits.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    ruled_out[torch.arange(50), target] = False
    logits = logits.masked_fill(ruled_out, float("-inf"))
    loss, grad = check_against_reference(logits, target, 0.1, "none")
    assert torch.all(loss.isfinite())
    assert torch.all(grad[ruled_out] == 0)


def test_target_logit_minus_inf_gives_infinite_loss():
    logits = torch.tensor([[0.0, 1.0, float("-inf")]])
    loss = as_softmax_cross_entropy(logits, torch.tensor([2]), 0.1, reduction="none")
    assert loss.item() == math.inf


def test_extreme_logits_keep_precision():
    """p_t underflows in float32 here; the loss must still be the exact log-softmax value."""
    logits = torch.tensor([[0.0, 120.0, 3.0], [-200.0, 0.0, 1.0]])
    target = torch.tensor([0, 0])
    check_against_reference(logits, target, 0.1, "none")
    check_against_reference(logits, target, 0.0, "none")


def test_gradcheck_float64():
    logits, target = single_label_data((6,), 5, dtype=torch.float64, seed=13, ignore=0.2)
    leaf = logits.clone().requires_grad_()
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: as_softmax_cross_entropy(z, target, 0.2, reduction=r), (leaf,)
        )
    logits3, target3 = single_label_data((2, 3), 4, dtype=torch.float64, seed=14)
    leaf3 = logits3.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: as_softmax_cross_entropy(z, target3, 0.2), (leaf3,))


def test_retain_graph_and_repeated_backward():
    """Backward scales its buffer in place only when the graph is freed afterwards."""
    logits, target = single_label_data((64,), 30, seed=15)
    leaf = logits.clone().requires_grad_()
    loss = as_softmax_cross_entropy(leaf, target, 0.1)
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (third,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, third, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, leaf)


def test_no_grad_and_grad_paths_agree():
    logits, target = single_label_data((3, 20), 12, seed=16, ignore=0.2)
    with torch.no_grad():
        plain = as_softmax_cross_entropy(logits, target, 0.1, reduction="none")
    with_grad = as_softmax_cross_entropy(
        logits.clone().requires_grad_(), target, 0.1, reduction="none"
    )
    torch.testing.assert_close(plain, with_grad.detach(), rtol=0, atol=0)


def test_stats_count_reference_masked_rows():
    logits, target = single_label_data((2000,), 8, seed=17, ignore=0.1)
    _, masked, valid = as_softmax_loss_and_stats(logits, target, 0.1)
    keep = reference_keep(logits, target, 0.1)
    only_target = keep.sum(dim=1) == 1
    assert valid.item() == int((target != -100).sum())
    assert masked.item() == int(only_target.sum())
    assert 0 < masked.item() < valid.item()


@pytest.mark.parametrize(
    ("shape", "num_classes"), [((300,), 5), ((200,), 64), ((2, 9), 7), ((2, 40), 30)]
)
def test_keep_mask_matches_reference(shape, num_classes):
    logits, target = single_label_data(shape, num_classes, seed=18, ignore=0.1)
    keep = as_softmax_keep_mask(logits, target, 0.1)
    expected = reference_keep(logits, target, 0.1)
    assert keep.shape == logits.shape
    assert torch.equal(_rows(keep), expected)


def test_saved_tensors_no_larger_than_cross_entropy():
    for n, c in [(512, 5), (64, 300)]:
        logits, target = single_label_data((n,), c, seed=19)
        leaf = logits.clone().requires_grad_()
        ours = saved_bytes(lambda z=leaf, t=target: as_softmax_cross_entropy(z, t, 0.1))
        ce = saved_bytes(lambda z=leaf, t=target: F.cross_entropy(z, t))
        assert ours <= ce, (n, c, ours, ce)


def test_target_range_errors_unchanged():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="class index 4, outside"):
        as_softmax_cross_entropy(logits, torch.tensor([0, 4, -100]), 0.1)
    with pytest.raises(ValueError, match="class index -2, outside"):
        as_softmax_cross_entropy(logits, torch.tensor([0, -2, 1]), 0.1)
    assert as_softmax_cross_entropy(logits, torch.tensor([-100, -100, -100]), 0.1).item() == 0.0


# --------------------------------------------------------------------------- multi-label


def check_multilabel(logits, target, delta, reduction):
    leaf = logits.detach().clone().requires_grad_()
    ref_leaf = logits.detach().clone().requires_grad_()
    loss = multilabel_as_softmax_loss(leaf, target, delta, reduction=reduction)
    expected = reference_multilabel_loss(ref_leaf, target, delta, reduction)
    loss_tol, grad_tol = tolerances(logits.dtype)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss.double(), expected, **loss_tol, equal_nan=True)
    finite = expected.isfinite() if expected.dim() else expected.isfinite().reshape(1)
    weights = torch.rand(
        loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    (grad,) = torch.autograd.grad((loss.double() * weights).sum(), leaf)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), ref_leaf)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    if bool(finite.all()):
        torch.testing.assert_close(
            grad.double(), expected_grad.to(logits.dtype).double(), **grad_tol, equal_nan=True
        )
    return loss, grad


@pytest.mark.parametrize(
    "shape", [(64, 3), (200, 5), (50, 16), (40, 150), (9, 1000), (150, 700), (4, 7, 9), (2, 30, 40)]
)
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.3, 1.0])
def test_multilabel_matches_reference(shape, delta):
    logits, target = multilabel_data(shape, seed=20)
    target[0] = 0  # a row without positives
    target[1] = 1  # a row without negatives
    for reduction in ("none", "sum", "mean"):
        check_multilabel(logits, target, delta, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(100, 5), (30, 200), (3, 6, 11)])
def test_multilabel_across_dtypes(dtype, shape):
    logits, target = multilabel_data(shape, dtype=dtype, seed=21)
    check_multilabel(logits, target, 0.1, "none")


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.long, torch.uint8, torch.float64])
def test_multilabel_target_dtypes(target_dtype):
    logits, target = multilabel_data((40, 12), seed=22)
    check_multilabel(logits, target.to(target_dtype), 0.1, "mean")


def test_multilabel_extreme_logits_use_exact_rows():
    """Large |logsumexp| and positives near underflow take the shifted-exponential path."""
    logits, target = multilabel_data((64, 9), seed=23, scale=40.0)
    logits[0, :] -= 300.0
    logits[1, :] += 300.0
    check_multilabel(logits, target, 0.1, "none")
    check_multilabel(logits, target, 0.0, "none")


def test_multilabel_one_dimensional_and_masked_rows():
    logits = torch.tensor([[6.0, -6.0, -6.0], [0.5, 0.0, -0.5], [-9.0, 9.0, 8.5]])
    target = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    leaf = logits.clone().requires_grad_()
    loss, masked, count = multilabel_as_softmax_loss_and_stats(leaf, target, 0.2, reduction="none")
    expected = reference_multilabel_loss(logits, target, 0.2, "none")
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)
    assert loss[0].item() == 0.0 and loss[1].item() > 0
    assert masked.item() == int((expected == 0).sum()) and count.item() == 3
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert torch.all(grad[loss == 0] == 0)
    check_multilabel(logits[1], target[1], 0.2, "none")


def test_multilabel_nan_rows_surface_and_minus_inf_negatives_are_fine():
    logits, target = multilabel_data((6, 7), seed=24)
    target[:, 0] = 1
    target[:, 1] = 0
    logits[2, 3] = float("nan")
    logits[4, 1] = float("-inf")  # a negative ruled out
    loss, masked, _ = multilabel_as_softmax_loss_and_stats(logits, target, 0.1, reduction="none")
    assert loss[2].isnan()
    ok = torch.arange(6) != 2
    torch.testing.assert_close(
        loss[ok].double(),
        reference_multilabel_loss(logits, target, 0.1, "none")[ok],
        atol=2e-5,
        rtol=2e-5,
    )
    assert masked.item() == int((loss[ok] == 0).sum())


def test_multilabel_gradcheck_float64():
    logits, target = multilabel_data((5, 6), dtype=torch.float64, seed=25)
    target[0] = 0
    leaf = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: multilabel_as_softmax_loss(z, target, 0.2, reduction="none"), (leaf,)
    )
    logits3, target3 = multilabel_data((2, 4, 3), dtype=torch.float64, seed=26)
    leaf3 = logits3.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: multilabel_as_softmax_loss(z, target3, 0.2), (leaf3,))


def test_losses_can_be_modified_in_place_before_backward():
    """Weighting the per-sample loss in place must not invalidate the saved state."""
    logits, target = single_label_data((40,), 12, seed=32)
    weights = torch.rand(40, generator=torch.Generator().manual_seed(3))
    leaf = logits.clone().requires_grad_()
    loss = as_softmax_cross_entropy(leaf, target, 0.1, reduction="none")
    loss.mul_(weights)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    ref_leaf = logits.clone().requires_grad_()
    expected = reference_loss(ref_leaf, target, 0.1, reduction="none") * weights.double()
    (expected_grad,) = torch.autograd.grad(expected.sum(), ref_leaf)
    torch.testing.assert_close(grad.double(), expected_grad.double(), atol=2e-6, rtol=1e-4)

    ml_logits, ml_target = multilabel_data((40, 12), seed=33)
    ml_leaf = ml_logits.clone().requires_grad_()
    ml_loss = multilabel_as_softmax_loss(ml_leaf, ml_target, 0.1, reduction="none")
    ml_loss.mul_(weights)
    (ml_grad,) = torch.autograd.grad(ml_loss.sum(), ml_leaf)
    ml_ref_leaf = ml_logits.clone().requires_grad_()
    ml_expected = reference_multilabel_loss(ml_ref_leaf, ml_target, 0.1, "none") * weights.double()
    (ml_expected_grad,) = torch.autograd.grad(ml_expected.sum(), ml_ref_leaf)
    torch.testing.assert_close(ml_grad.double(), ml_expected_grad.double(), atol=2e-6, rtol=1e-4)


def test_multilabel_retain_graph():
    logits, target = multilabel_data((30, 20), seed=27)
    leaf = logits.clone().requires_grad_()
    loss = multilabel_as_softmax_loss(leaf, target, 0.1)
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(300, 5), (40, 64), (3, 5, 7)])
def test_multilabel_keep_mask_matches_reference(shape):
    logits, target = multilabel_data(shape, seed=28)
    keep = multilabel_as_softmax_keep_mask(logits, target, 0.1)
    assert keep.shape == logits.shape
    assert torch.equal(_rows(keep), reference_multilabel_keep(logits, target, 0.1))


def test_multilabel_saved_tensors_no_larger_than_bce():
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    logits, target = multilabel_data((256, 40), seed=29)
    leaf = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        multilabel_as_softmax_loss(leaf, target, 0.1)
    ours = sum(storages.values())
    storages.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.binary_cross_entropy_with_logits(leaf, target)
    assert ours <= sum(storages.values())


@pytest.mark.parametrize(
    ("target", "bad"),
    [
        (torch.tensor([[0.0, 0.5]]), "0.5"),
        (torch.tensor([[1 - 2**-24, 1.0]]), ""),  # 0.99999994: rejected, however it prints
        (torch.tensor([[float("nan"), 1.0]]), "nan"),
        (torch.tensor([[2, 0]]), "2"),
        (torch.tensor([[-1, 0]]), "-1"),
        (torch.tensor([[3, 0]], dtype=torch.uint8), "3"),
    ],
)
def test_multilabel_target_value_errors(target, bad):
    with pytest.raises(ValueError, match=f"only 0 and 1, found {bad}"):
        multilabel_as_softmax_loss(torch.randn(1, 2), target)


@pytest.mark.parametrize("shape", [(37, 5), (3, 5, 11), (20, 40), (7,)])
@pytest.mark.parametrize("side", ["negative", "too high"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_class_index_out_of_range_anywhere_is_reported(
    shape, side, reduction, requires_grad
):
    # One class index out of range anywhere (here the last) raises the error naming it,
    # ignore_index is still skipped, and nothing is left behind.
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(shape, generator=g).requires_grad_(requires_grad)
    num_classes = shape[1] if len(shape) > 1 else shape[0]
    target = torch.randint(0, num_classes, shape[:1] + shape[2:] if len(shape) > 1 else ())
    if target.dim():
        target.view(-1)[0] = -100
    assert torch.isfinite(as_softmax_cross_entropy(logits, target, reduction=reduction)).all()
    bad = -1 if side == "negative" else num_classes
    target.view(-1)[-1] = bad
    logits.grad = None
    with pytest.raises(ValueError, match=f"class index {bad}, outside"):
        as_softmax_cross_entropy(logits, target, reduction=reduction)
    assert logits.grad is None


@pytest.mark.parametrize("shape", [(37, 5), (3, 5, 11), (20, 40)])
@pytest.mark.parametrize(
    ("target_dtype", "bad"),
    [(torch.float32, 0.5), (torch.float64, 0.5), (torch.uint8, 2), (torch.int64, 2)],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_multilabel_bad_label_anywhere_is_reported(
    shape, target_dtype, bad, reduction, requires_grad
):
    # One bad label anywhere (here the last) raises the error that names it, and nothing is
    # left behind.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(shape, generator=g).requires_grad_(requires_grad)
    target = (torch.rand(shape, generator=g) < 0.3).to(target_dtype)
    target.view(-1)[-1] = bad
    with pytest.raises(ValueError, match=f"only 0 and 1, found {bad}"):
        multilabel_as_softmax_loss(logits, target, reduction=reduction)
    assert logits.grad is None


@pytest.mark.parametrize(("loss", "ignored"), [("single", 0.2), ("single", 1.0), ("multi", 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_is_the_reduction_of_the_rows(loss, reduction, ignored):
    # Against the per-row losses, reduced in float64 here, and their gradient.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(70000, 5, generator=g) * 3
    if loss == "single":
        target = torch.randint(0, 5, (70000,), generator=g)
        target[torch.rand(70000, generator=g) < ignored] = -100
        count = max(int((target != -100).sum()), 1)

        def fn(z, reduction):
            return as_softmax_cross_entropy(z, target, 0.1, reduction=reduction)
    else:  # multi-label rows are never ignored
        target = torch.rand(70000, 5, generator=g) < 0.3
        count = 70000

        def fn(z, reduction):
            return multilabel_as_softmax_loss(z, target, 0.1, reduction=reduction)

    leaf = logits.clone().requires_grad_()
    reduced = fn(leaf, reduction)
    reduced.backward()
    ref_leaf = logits.clone().requires_grad_()
    rows = fn(ref_leaf, "none").double()
    expected = rows.sum() / (count if reduction == "mean" else 1)
    expected.backward()
    assert reduced.dim() == 0 and reduced.dtype == torch.float32
    torch.testing.assert_close(reduced.double(), expected.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-12)
    if ignored == 1.0:
        assert reduced.item() == 0.0 and (leaf.grad == 0).all()


# --------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    logits, target = single_label_data((64,), 300, seed=30, ignore=0.1)
    cpu = as_softmax_cross_entropy(logits, target, 0.1, reduction="none")
    cuda = as_softmax_cross_entropy(logits.cuda(), target.cuda(), 0.1, reduction="none")
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-5)
    ml_logits, ml_target = multilabel_data((64, 30), seed=31)
    torch.testing.assert_close(
        multilabel_as_softmax_loss(ml_logits.cuda(), ml_target.cuda(), 0.1, reduction="none").cpu(),
        multilabel_as_softmax_loss(ml_logits, ml_target, 0.1, reduction="none"),
        atol=1e-5,
        rtol=1e-5,
    )
