"""The compiled C kernel of the multi-label loss against independent references and the torch
implementation, and the loader's fallbacks (no compiler, a failing compiler, disabled by env)."""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable

import pytest
import torch
from helpers import count_calls
from reference import reference_multilabel

from lightning_assoftmax.functional import (
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
    multilabel_masked_sample_ratio,
)
from lightning_assoftmax.ops import _native
from lightning_assoftmax.ops import multi_label as ml_ops

NATIVE_ENV = "LIGHTNING_ASSOFTMAX_NATIVE"
HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))
needs_compiler = pytest.mark.skipif(
    not HAS_COMPILER, reason="no C compiler (cc, gcc, clang) on PATH"
)

F32 = dict(rtol=1e-5, atol=1e-6)
F64 = dict(rtol=1e-10, atol=1e-12)
HALF_GRAD = dict(rtol=1e-2, atol=1e-4)


# -- data and references ---------------------------------------------------------------------------
def mixed_rows(m: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, c)`` float32 scores and bool labels cycling through eight kinds of rows: confident
    with one or two positives (every term masked for small delta), no positives, all positives,
    positives scored below negatives (nothing masked), one confident positive among random scores
    (partly masked) and random rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, c, generator=g) * 3
    target = torch.rand(m, c, generator=g) < 0.3
    kind = (torch.arange(m) % 8)[:, None]
    rows = torch.arange(m)
    first = torch.randint(c, (m,), generator=g)
    second = (first + 1 + torch.randint(max(c - 1, 1), (m,), generator=g)) % c
    one = torch.zeros(m, c, dtype=torch.bool)
    one[rows, first] = True
    two = one.clone()
    if c >= 3:
        two[rows, second] = True
    target = torch.where(kind == 0, one, torch.where(kind == 1, two, target))
    target = torch.where(kind == 2, False, torch.where(kind == 3, True, target))
    jitter = torch.rand(m, c, generator=g)
    confident = torch.where(target, 6.0 + jitter, -6.0 - jitter)
    wrong = torch.where(target, -2.0, 2.0) + torch.randn(m, c, generator=g) * 0.5
    logits = torch.where(kind <= 1, confident, torch.where(kind == 4, wrong, logits))
    partly = torch.randn(m, c, generator=g) * 1.5
    partly[:, 0] += 9.0
    logits = torch.where(kind == 6, partly, logits)
    target = torch.where((kind == 6) & (torch.arange(c) == 0), True, target)
    return logits, target


def shaped(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mixed_rows` as ``(M, C)`` or as contiguous channel-second ``(N, C, L)``."""
    if len(shape) == 2:
        return mixed_rows(*shape, seed=seed)
    n, c, length = shape
    rows, target = mixed_rows(n * length, c, seed=seed)
    logits = rows.reshape(n, length, c).permute(0, 2, 1).contiguous()
    return logits, target.reshape(n, length, c).permute(0, 2, 1).contiguous()


def class_rows(x: torch.Tensor) -> torch.Tensor:
    """``(M, C)`` rows in the package's order: ``x.movedim(1, -1).reshape(-1, C)``."""
    return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


def all_terms_masked(
    logits: torch.Tensor, target: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC keep rules restated in float64 on ``(M, C)`` rows: ``(rows whose every term is
    masked, kept terms)``."""
    p = torch.softmax(logits.double(), dim=1)
    pos = target.bool()
    neg = ~pos
    two_sided = pos.any(1) & neg.any(1)
    min_pos = p.masked_fill(neg, math.inf).amin(1, keepdim=True)
    max_neg = p.masked_fill(pos, -math.inf).amax(1, keepdim=True)
    kept = (neg & (min_pos - p <= delta)) | (pos & (p - max_neg <= delta))
    return two_sided & ~kept.any(1), kept


def check_reference(
    base: torch.Tensor,
    target: torch.Tensor,
    delta: float,
    reduction: str = "none",
    view: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    loss_tol: dict | None = None,
    grad_tol: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and ``.backward()`` gradient of ``view(leaf)`` against ``reference_multilabel`` on a
    float64 copy and its plain-autograd gradient. Returns (loss, grad, reference row losses)."""
    exact = base.dtype == torch.float64
    loss_tol = loss_tol or (F64 if exact else F32)
    grad_tol = grad_tol or (F64 if exact else F32)
    leaf = base.detach().clone().requires_grad_()
    logits = view(leaf)
    loss = multilabel_as_softmax_loss(logits, target, delta, reduction=reduction)

    ref_leaf = base.detach().double().requires_grad_()
    ref_logits = view(ref_leaf)
    ref_rows = reference_multilabel(class_rows(ref_logits), class_rows(target), delta)
    row_shape = logits.shape[:1] + logits.shape[2:]
    num_rows = ref_rows.shape[0]
    if reduction == "none":
        g = torch.Generator().manual_seed(99)
        weights = torch.rand(row_shape, generator=g, dtype=torch.float64) + 0.5
        expected = ref_rows.reshape(row_shape)
        (loss * weights.to(loss.dtype)).sum().backward()
        upstream = weights.reshape(-1)
    elif reduction == "sum":
        expected = ref_rows.sum()
        loss.backward()
        upstream = torch.ones(num_rows, dtype=torch.float64)
    else:
        expected = ref_rows.mean()
        loss.backward()
        upstream = torch.full((num_rows,), 1.0 / num_rows, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(ref_rows, ref_leaf, grad_outputs=upstream)

    assert loss.dtype == (torch.float64 if exact else torch.float32)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss.detach().double(), expected.detach(), **loss_tol)
    grad = leaf.grad
    assert grad.dtype == base.dtype and grad.shape == base.shape
    torch.testing.assert_close(grad.double(), expected_grad, **grad_tol)
    return loss.detach(), grad, ref_rows.detach()


def assert_masked_rows_exact(
    logits: torch.Tensor, target: torch.Tensor, delta: float, loss_rows, grad
) -> torch.Tensor:
    """Rows whose every term is masked (independent rule) have loss and gradient exactly 0, and
    they are exactly the rows with a zero loss (moderate scores: no log1p underflow)."""
    masked, _ = all_terms_masked(class_rows(logits.detach()), class_rows(target), delta)
    loss_rows = loss_rows.reshape(-1)
    assert torch.equal(loss_rows == 0, masked)
    assert (class_rows(grad)[masked] == 0).all()
    return masked


# -- which implementation runs -----------------------------------------------------------------------
def usable_environment(monkeypatch) -> None:
    """Enable the kernels and drop a ``$CC`` that names no program (the PATH compiler is used)."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler (cc, gcc, clang) on PATH")
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    cc = os.environ.get("CC")
    if cc and shutil.which(cc) is None:
        monkeypatch.delenv("CC")


def require_c(monkeypatch) -> None:
    """Skip without a compiler; otherwise the C kernels must load (a failed earlier attempt in
    an environment fixed by :func:`usable_environment` is retried on a fresh, restored state)."""
    usable_environment(monkeypatch)
    if _native._state["tried"] and _native._state["lib"] is None:
        fresh_state(monkeypatch)
    if _native.native_library() is None:
        pytest.fail(f"C kernels did not load: {_native.native_status()}")


def use_vector_kernels(request, enabled: bool) -> None:
    """Switch the AVX-512 kernels on or off for one test (skip if asked for and not built)."""
    if enabled and not _native.vector_kernels_available():
        pytest.skip("the AVX-512 kernels are not built on this CPU")
    previous = _native.set_vector_kernels(enabled)
    request.addfinalizer(lambda: _native.set_vector_kernels(previous))


@pytest.fixture(params=["vector", "generic"])
def c_path(request, monkeypatch):
    """Force the C kernels, once with the AVX-512 ones where they apply and once with the generic
    ones only: skip without a compiler, fail if they do not load, and make any use of the torch
    implementation an error."""
    require_c(monkeypatch)
    use_vector_kernels(request, request.param == "vector")

    def torch_path(*args, **kwargs):
        raise AssertionError("the torch implementation ran instead of the C kernel")

    monkeypatch.setattr(ml_ops, "_torch_forward", torch_path)


@pytest.fixture
def torch_calls(monkeypatch):
    """Counts the calls of the torch implementation."""
    return count_calls(monkeypatch, ml_ops, "_torch_forward")


# -- C kernel against the reference ------------------------------------------------------------------
@pytest.mark.parametrize("delta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("num_classes", [1, 2, 5, 31, 32, 33, 64, 150, 700])
def test_rows_match_reference(c_path, num_classes, delta):
    logits, target = mixed_rows(37, num_classes, seed=num_classes)
    for reduction in ("none", "sum", "mean"):
        loss, grad, ref = check_reference(logits, target.long(), delta, reduction)
        if reduction == "none":
            masked = assert_masked_rows_exact(logits, target, delta, loss, grad)
    if num_classes >= 2 and delta < 1:
        assert masked.any() and not masked.all()  # the batch mixes masked and unmasked rows
    if num_classes >= 5:
        _, kept = all_terms_masked(logits, target, delta)
        partly = kept.any(1) & ~kept.all(1)
        assert kept.all(1).any() and (partly.any() or delta == 1.0)
    assert (ref[3::8] > 0).all()  # rows without negatives keep their positives


@pytest.mark.parametrize("num_classes", [5, 150])
@pytest.mark.parametrize("length", [1, 3, 64, 130])
def test_channel_second_matches_reference(c_path, length, num_classes):
    n = 3
    logits, target = shaped((n, num_classes, length), seed=length + num_classes)
    for reduction in ("sum", "mean", "none"):
        loss, grad, _ = check_reference(logits, target, 0.1, reduction)
    assert loss.shape == (n, length)
    assert_masked_rows_exact(logits, target, 0.1, loss, grad)


@pytest.mark.parametrize("num_classes", [5, 150])
@pytest.mark.parametrize("length", [3, 70])
def test_token_style_transposed_view_matches_reference(c_path, length, num_classes):
    n = 2
    rows, target = mixed_rows(n * length, num_classes, seed=7 + length)
    tokens = rows.reshape(n, length, num_classes)  # contiguous (N, L, C)
    target = target.reshape(n, length, num_classes).transpose(1, 2)
    for reduction in ("none", "mean"):
        loss, grad, _ = check_reference(
            tokens, target, 0.1, reduction, view=lambda t: t.transpose(1, 2)
        )
    assert loss.shape == ()
    assert grad.shape == (n, length, num_classes)


@pytest.mark.parametrize("num_classes", [5, 150])
@pytest.mark.parametrize("kind", ["column slice", "row slice", "transposed"])
def test_non_contiguous_2d_logits_match_reference(c_path, kind, num_classes):
    m = 45
    if kind == "column slice":
        big, target = mixed_rows(m, 2 * num_classes, seed=11)
        target = target[:, ::2]

        def view(t):
            return t[:, ::2]

    elif kind == "row slice":
        big, target = mixed_rows(2 * m, num_classes, seed=12)
        target = target[::2]

        def view(t):
            return t[::2]

    else:
        rows, target = mixed_rows(m, num_classes, seed=13)
        big = rows.t().contiguous()  # (C, M): its transpose is a non-contiguous (M, C)

        def view(t):
            return t.t()

    assert not view(big).is_contiguous()
    loss, grad, _ = check_reference(big, target, 0.1, "none", view=view)
    if kind == "column slice":
        assert (grad[:, 1::2] == 0).all()  # the skipped columns are not logits
    assert_masked_rows_exact(view(big), target, 0.1, loss, view(grad))


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "target_dtype", [torch.float32, torch.float64, torch.int64, torch.bool, torch.uint8]
)
def test_target_dtypes(c_path, target_dtype, logits_dtype):
    for num_classes in (6, 150):
        logits, target = mixed_rows(40, num_classes, seed=21)
        logits = logits.to(logits_dtype)
        check_reference(logits, target.to(target_dtype), 0.1, "mean")
        # The same labels read through strides (a non-contiguous target).
        wide = torch.zeros(40, 2 * num_classes, dtype=target_dtype)
        wide[:, 1::2] = target.to(target_dtype)
        check_reference(logits, wide[:, 1::2], 0.1, "none")
        # Channel-second logits with a target of that dtype.
        logits3 = logits.reshape(4, 10, num_classes).transpose(1, 2).contiguous()
        target3 = target.reshape(4, 10, num_classes).transpose(1, 2).to(target_dtype)
        check_reference(logits3, target3, 0.1, "sum")


@pytest.mark.parametrize("shape", [(50, 5), (50, 33), (20, 150), (2, 150, 3), (2, 7, 70)])
def test_float64_logits(c_path, shape):
    rows, target = shaped(shape, seed=31)
    for delta in (0.0, 0.3):
        loss, grad, _ = check_reference(rows.double(), target, delta, "none")
        assert_masked_rows_exact(rows, target, delta, loss, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(60, 5), (30, 150), (2, 9, 70), (2, 150, 5)])
def test_half_logits(c_path, dtype, shape):
    rows, target = shaped(shape, seed=41)
    # The float64 reference sees exactly the half values; the loss is float32, the gradient half.
    loss, grad, _ = check_reference(rows.to(dtype), target, 0.1, "none", grad_tol=HALF_GRAD)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_masked_rows_exact(rows.to(dtype), target, 0.1, loss, grad)


@pytest.mark.parametrize("shape", [(40, 5), (40, 150), (2, 5, 70)])
def test_no_grad_forward_matches_grad_forward_and_reference(c_path, shape):
    rows, target = mixed_rows(shape[0] * (shape[2] if len(shape) == 3 else 1), shape[1], seed=51)
    logits = rows if len(shape) == 2 else rows.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    target = (
        target if len(shape) == 2 else target.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    )
    with torch.no_grad():
        plain = multilabel_as_softmax_loss(logits, target, 0.1, reduction="none")
    loss, _, _ = check_reference(logits, target, 0.1, "none")  # clone keeps the strides
    assert torch.equal(plain, loss)


# -- C kernel against the torch implementation -------------------------------------------------------
def _loss_and_grad(logits, target, delta, weights):
    leaf = logits.clone().requires_grad_()
    loss = multilabel_as_softmax_loss(leaf, target, delta, reduction="none")
    (loss * weights).sum().backward()
    return loss.detach(), leaf.grad


@needs_compiler
@pytest.mark.parametrize("delta", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("shape", [(300, 3), (200, 20), (64, 150), (4, 150, 33), (3, 7, 100)])
def test_c_and_torch_paths_agree(monkeypatch, torch_calls, shape, delta):
    # Random rows among the confident, one-sided and wrong rows of mixed_rows.
    logits, target = shaped(shape, seed=61 + len(shape))
    g = torch.Generator().manual_seed(62)
    logits = logits * (0.5 + torch.rand(logits.shape, generator=g))
    weights = torch.rand(logits.shape[:1] + logits.shape[2:], generator=g)

    require_c(monkeypatch)
    c_loss, c_grad = _loss_and_grad(logits, target, delta, weights)
    assert not torch_calls
    monkeypatch.setenv(NATIVE_ENV, "0")
    t_loss, t_grad = _loss_and_grad(logits, target, delta, weights)
    assert torch_calls

    torch.testing.assert_close(c_loss, t_loss, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(c_grad, t_grad, rtol=2e-6, atol=1e-7)
    assert torch.equal(c_loss == 0, t_loss == 0)
    masked, _ = all_terms_masked(class_rows(logits), class_rows(target), delta)
    assert masked.any() and not masked.all()
    for loss, grad in ((c_loss, c_grad), (t_loss, t_grad)):
        assert torch.equal(loss.reshape(-1) == 0, masked)
        assert (class_rows(grad)[masked] == 0).all()
        assert (class_rows(grad)[~masked] != 0).any(1).all()
    ratio = multilabel_masked_sample_ratio(logits, target, delta)
    assert ratio.item() == pytest.approx(masked.double().mean().item(), abs=1e-7)


@needs_compiler
@pytest.mark.parametrize("labels", [torch.float32, torch.bool])
@pytest.mark.parametrize("num_classes", [1, 2, 3, 5, 8, 15, 16])
@pytest.mark.parametrize("layout", ["rows", "tokens"])
def test_vector_and_generic_kernels_agree(request, monkeypatch, layout, num_classes, labels):
    """The AVX-512 kernels against the generic C ones on the same inputs: rows and token-major
    views, tiles cut short (rows not a multiple of 16, tiles across samples), hostile rows."""
    require_c(monkeypatch)
    use_vector_kernels(request, True)
    m = 16 * 7 + 5
    logits, target = mixed_rows(m, num_classes, seed=63 + num_classes)
    logits[3, 0] = math.nan
    logits[5, -1] = math.inf
    logits[7, 0] = -math.inf  # a class ruled out
    logits[9] = torch.where(target[9], -120.0, 40.0)  # positives underflow: the exact path
    if layout == "tokens":  # (N, L, C) viewed as (N, C, L): rows contiguous, L = 39 per sample
        logits = logits.reshape(3, 39, num_classes).transpose(1, 2)
        target = target.reshape(3, 39, num_classes).transpose(1, 2)
    target = target.to(labels)
    g = torch.Generator().manual_seed(64)
    weights = torch.rand(logits.shape[:1] + logits.shape[2:], generator=g)
    v_loss, v_grad = _loss_and_grad(logits, target, 0.1, weights)
    _native.set_vector_kernels(False)
    g_loss, g_grad = _loss_and_grad(logits, target, 0.1, weights)

    torch.testing.assert_close(v_loss, g_loss, rtol=2e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(v_grad, g_grad, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert torch.equal(v_loss == 0, g_loss == 0)
    assert torch.equal(v_grad == 0, g_grad == 0)
    assert torch.isnan(class_rows(v_grad)[3]).all() and torch.isnan(v_loss.reshape(-1)[[3, 5]]).all()
    assert torch.isfinite(v_loss.reshape(-1)[9])


# -- hostile rows through the C kernel ---------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [5, 150])
@pytest.mark.parametrize("side", ["positive", "negative"])
def test_nan_row_surfaces_and_is_never_masked(c_path, num_classes, side):
    logits, target = mixed_rows(30, num_classes, seed=71)
    bad = 8  # a confident row: masked without the NaN
    col = int(target[bad].nonzero()[0]) if side == "positive" else int((~target[bad]).nonzero()[0])
    logits[bad, col] = math.nan
    leaf = logits.clone().requires_grad_()
    loss = multilabel_as_softmax_loss(leaf, target, 0.1, reduction="none")
    assert math.isnan(loss[bad].item())
    ok = torch.arange(30) != bad
    ref = reference_multilabel(logits[ok].double(), target[ok], 0.1)
    torch.testing.assert_close(loss[ok].detach().double(), ref, **F32)
    loss[ok].sum().backward()
    ref_leaf = logits[ok].double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(
        reference_multilabel(ref_leaf, target[ok], 0.1).sum(), ref_leaf
    )
    torch.testing.assert_close(leaf.grad[ok].double(), ref_grad, **F32)

    expected_masked = int((ref == 0).sum())
    assert expected_masked > 0
    ratio = multilabel_masked_sample_ratio(logits, target, 0.1)
    assert ratio.item() == pytest.approx(expected_masked / 30)
    _, masked, count = multilabel_as_softmax_loss_and_stats(logits, target, 0.1)
    assert masked.item() == expected_masked and count.item() == 30


@pytest.mark.parametrize("num_classes", [5, 150])
@pytest.mark.parametrize("bad", ["+inf negative", "-inf positive"])
def test_wrong_side_infinite_logit_gives_non_finite_loss(c_path, num_classes, bad):
    logits, target = mixed_rows(30, num_classes, seed=72)
    row = 8  # confident and masked without the infinity
    if bad == "+inf negative":
        col = int((~target[row]).nonzero()[0])
        logits[row, col] = math.inf
    else:
        col = int(target[row].nonzero()[0])
        logits[row, col] = -math.inf
    loss = multilabel_as_softmax_loss(logits, target, 0.1, reduction="none")
    assert not math.isfinite(loss[row].item())
    ok = torch.arange(30) != row
    ref = reference_multilabel(logits[ok].double(), target[ok], 0.1)
    torch.testing.assert_close(loss[ok].double(), ref, **F32)
    _, masked, count = multilabel_as_softmax_loss_and_stats(logits, target, 0.1)
    assert masked.item() == int((ref == 0).sum()) and count.item() == 30


@pytest.mark.parametrize("num_classes", [3, 150])
def test_minus_inf_positive_loss_is_plus_inf(c_path, num_classes):
    logits = torch.zeros(2, num_classes)
    logits[:, 0] = -math.inf
    logits[:, 1] = 1.0
    target = torch.zeros(2, num_classes, dtype=torch.long)
    target[:, 0] = 1
    ref = reference_multilabel(logits.double(), target, 0.1)
    assert ref.tolist() == [math.inf, math.inf]
    loss = multilabel_as_softmax_loss(logits, target, 0.1, reduction="none")
    assert loss.tolist() == [math.inf, math.inf]


@pytest.mark.parametrize("num_classes", [5, 150])
def test_minus_inf_negatives_are_fine(c_path, num_classes):
    logits, target = mixed_rows(36, num_classes, seed=73)
    target[:, 0] = True  # every row has a positive that stays finite
    target[:, 1] = False
    ruled_out = torch.zeros_like(target)
    ruled_out[::2, 1] = True  # one negative per row ruled out
    ruled_out[1::4] = ~target[1::4]  # every negative ruled out
    logits = logits.masked_fill(ruled_out, -math.inf)
    loss, grad, _ = check_reference(logits, target, 0.1, "none")
    assert torch.isfinite(loss).all()
    assert (grad[ruled_out] == 0).all()
    assert torch.isfinite(grad).all()


def extreme_rows(c: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Moderate rows interleaved with +-200 and +-1e4 scaled rows, rows shifted by +-300 (huge
    |logsumexp|) and rows whose positive sits near underflow."""
    logits, target = mixed_rows(24, c, seed=74)
    g = torch.Generator().manual_seed(75)
    logits = logits.double()
    target[:, 0] = True
    target[:, 1] = False
    logits[1] = torch.randn(c, generator=g, dtype=torch.float64) * 200
    logits[3] = torch.randn(c, generator=g, dtype=torch.float64) * 1e4
    logits[5] += 300.0
    logits[7] -= 300.0
    logits[9] = torch.randn(c, generator=g, dtype=torch.float64)
    logits[9, 0] = -120.0 if dtype != torch.float64 else -900.0  # the positive far below
    target[11] = False
    target[11, 0] = True
    logits[11] = torch.where(target[11], 200.0, -200.0)  # confident at a huge scale
    logits[13] = torch.where(target[13], -1e4, 1e4)  # wrong at a huge scale
    return logits.to(dtype), target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [4, 150])
@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_extreme_magnitudes_take_the_exact_path(c_path, monkeypatch, num_classes, dtype, delta):
    logits, target = extreme_rows(num_classes, dtype)
    exact_rows = []
    original = ml_ops._exact_rows

    def counted(scores, positive, d):
        exact_rows.append(scores.shape[0])
        return original(scores, positive, d)

    monkeypatch.setattr(ml_ops, "_exact_rows", counted)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    loss, grad, ref = check_reference(logits, target, delta, "none", loss_tol=tol, grad_tol=tol)
    # Some huge rows were recomputed exactly, the moderate ones were not.
    assert exact_rows and 0 < exact_rows[0] < logits.shape[0] // 2
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[13].item() == pytest.approx(ref[13].item(), rel=1e-6) and loss[13] > 1e4
    assert loss[11].item() == 0.0 and (grad[11] == 0).all()


# -- backward details --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 5), (40, 150), (2, 150, 9), (2, 5, 70)])
def test_retain_graph_gives_the_same_gradient_twice(c_path, shape):
    g = torch.Generator().manual_seed(81)
    leaf = (torch.randn(shape, generator=g) * 3).requires_grad_()
    target = torch.rand(shape, generator=g) < 0.3
    loss = multilabel_as_softmax_loss(leaf, target, 0.1)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(leaf.grad, 2 * first)
    leaf.grad = None
    loss.backward()
    assert torch.equal(leaf.grad, first)
    ref_leaf = leaf.detach().double().requires_grad_()
    ref = reference_multilabel(class_rows(ref_leaf), class_rows(target), 0.1).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(first.double(), ref_grad, **F32)


@pytest.mark.parametrize(
    "path,dtype,shape",
    [
        ("c", torch.float32, (36, 5)),
        ("c", torch.float32, (36, 150)),
        ("c", torch.float64, (36, 40)),
        ("c", torch.float32, (2, 6, 18)),
        ("c", torch.bfloat16, (36, 40)),
        ("torch", torch.float32, (36, 150)),
        ("torch", torch.float32, (36, 5)),
    ],
)
def test_nan_upstream_gradient_on_masked_row_gives_zero(monkeypatch, path, dtype, shape):
    if path == "c":
        require_c(monkeypatch)
    else:
        monkeypatch.setenv(NATIVE_ENV, "0")
    rows, target = shaped(shape, seed=82)
    leaf = rows.to(dtype).requires_grad_()
    loss = multilabel_as_softmax_loss(leaf, target, 0.1, reduction="none")
    masked = (loss == 0).reshape(-1)
    assert masked.sum() >= 2
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(83)) + 0.5
    flat = weights.view(-1)
    flat[masked.nonzero()[:2, 0]] = math.nan
    (loss * weights).sum().backward()
    grad_rows = class_rows(leaf.grad)
    assert (grad_rows[masked] == 0).all()
    assert torch.isfinite(grad_rows).all()
    ref_leaf = rows.to(dtype).double().requires_grad_()
    ref = reference_multilabel(class_rows(ref_leaf), class_rows(target), 0.1)
    assert torch.equal(ref == 0, masked)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, grad_outputs=torch.nan_to_num(flat.double()))
    tol = HALF_GRAD if dtype == torch.bfloat16 else F32
    torch.testing.assert_close(leaf.grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("shape", [(6, 7), (5, 40), (2, 5, 3)])
def test_gradcheck_float64(c_path, shape):
    g = torch.Generator().manual_seed(91)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    target = torch.rand(shape, generator=g) < 0.4
    target[0] = False  # a row (or sample) without positives
    leaf = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: multilabel_as_softmax_loss(z, target, 0.3, reduction="none"), (leaf,)
    )
    assert torch.autograd.gradcheck(lambda z: multilabel_as_softmax_loss(z, target, 0.3), (leaf,))


# -- several threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4099, 150), (33, 150, 128), (80000, 7)])
def test_threads_split_rows_with_identical_results(c_path, monkeypatch, shape):
    g = torch.Generator().manual_seed(101)
    logits = torch.randn(shape, generator=g) * 3
    target = torch.rand(shape, generator=g) < 0.2
    assert logits.numel() >= 2 * _native.PARALLEL_ELEMENTS  # enough work for two threads
    weights = torch.rand(logits.shape[:1] + logits.shape[2:], generator=g)
    workers = []
    original = _native._executor

    def spy(n):
        workers.append(n)
        return original(n)

    monkeypatch.setattr(_native, "_executor", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_loss, one_grad = _loss_and_grad(logits, target, 0.1, weights)
        assert not workers
        torch.set_num_threads(2)
        two_loss, two_grad = _loss_and_grad(logits, target, 0.1, weights)
    finally:
        torch.set_num_threads(before)
    assert workers and set(workers) == {2}  # forward and backward both split
    assert torch.equal(one_loss, two_loss)
    assert torch.equal(one_grad, two_grad)
    # Rows are independent: check a spread of them (both halves) against the reference.
    rows, labels = class_rows(logits), class_rows(target)
    pick = torch.arange(0, rows.shape[0], 97)
    ref_leaf = rows[pick].double().requires_grad_()
    ref = reference_multilabel(ref_leaf, labels[pick], 0.1)
    torch.testing.assert_close(two_loss.reshape(-1)[pick].double(), ref.detach(), **F32)
    row_weights = weights.reshape(-1)[pick].double()
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, grad_outputs=row_weights)
    torch.testing.assert_close(class_rows(two_grad)[pick].double(), ref_grad, **F32)


# -- loader ------------------------------------------------------------------------------------------
def fresh_state(monkeypatch) -> None:
    monkeypatch.setattr(
        _native, "_state", {"lib": None, "tried": False, "reason": "not loaded yet"}
    )


def small_case() -> tuple[torch.Tensor, torch.Tensor]:
    logits, target = mixed_rows(24, 7, seed=111)
    return logits, target


@needs_compiler
def test_kernel_compiles_into_the_cache_and_is_reused(tmp_path, monkeypatch, torch_calls):
    usable_environment(monkeypatch)
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_CACHE", str(tmp_path))
    fresh_state(monkeypatch)
    assert _native.native_status() == "not loaded yet"
    lib = _native.native_library()
    assert lib is not None
    assert _native.native_status() == "loaded"
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    assert _native.native_library() is lib
    logits, target = small_case()
    check_reference(logits, target, 0.1, "none")
    assert not torch_calls

    # A second process (fresh state) loads the cached library without compiling.
    fresh_state(monkeypatch)

    def no_compile(*args):
        raise AssertionError("compiled again although the library is cached")

    monkeypatch.setattr(_native, "_compile", no_compile)
    assert _native.native_library() is not None
    assert _native.native_status() == "loaded"
    assert list((tmp_path / "kernels").iterdir()) == built


def test_missing_compiler_falls_back_to_torch(tmp_path, monkeypatch, caplog, torch_calls):
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_CACHE", str(tmp_path / "cache"))
    fresh_state(monkeypatch)
    logits, target = small_case()
    with caplog.at_level(logging.WARNING, logger=_native.__name__):
        check_reference(logits, target, 0.1, "none")
        check_reference(logits, target, 0.5, "mean")
    assert _native.native_status().startswith("unavailable")
    assert _native.native_library() is None
    warnings = [r for r in caplog.records if r.name == _native.__name__]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # logged once
    assert "unavailable" in warnings[0].getMessage()
    assert torch_calls
    assert not (tmp_path / "cache" / "kernels").exists()


def test_failing_compiler_falls_back_and_leaves_no_temporary(
    tmp_path, monkeypatch, caplog, torch_calls
):
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` executable to stand in for a failing compiler")
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    monkeypatch.setenv("CC", failing)
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_CACHE", str(tmp_path))
    fresh_state(monkeypatch)
    logits, target = small_case()
    with caplog.at_level(logging.WARNING, logger=_native.__name__):
        check_reference(logits, target, 0.1, "sum")
    assert _native.native_status().startswith("unavailable")
    assert any(r.levelno == logging.WARNING for r in caplog.records if r.name == _native.__name__)
    assert torch_calls
    assert list((tmp_path / "kernels").iterdir()) == []


@pytest.mark.parametrize("value", ["0", "off"])
def test_disabled_by_env(monkeypatch, torch_calls, value):
    monkeypatch.setenv(NATIVE_ENV, value)
    assert _native.native_status() == "disabled"
    assert _native.native_library() is None
    logits, target = small_case()
    check_reference(logits, target, 0.1, "none")
    assert torch_calls
    # Read on every call: enabling it again takes effect at once.
    monkeypatch.delenv(NATIVE_ENV)
    assert _native.native_status() != "disabled"
    if HAS_COMPILER:
        require_c(monkeypatch)
        calls = len(torch_calls)
        check_reference(logits, target, 0.1, "none")
        assert _native.native_status() == "loaded"
        assert len(torch_calls) == calls


# -- subnormals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(256, 5), (64, 150), (2, 7, 40)])
@pytest.mark.parametrize("delta", [0.1, 1.0])
def test_scores_spread_past_the_float_range_match_the_reference(c_path, shape, delta):
    """Rows spanning more than 87 in score make e^(s - max) subnormal, which the kernel flushes
    to zero: losses and gradients still match the float64 reference to float32 accuracy."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.rand(shape, generator=g) * 2 - 1) * 60  # scores in [-60, 60]
    target = torch.rand(shape, generator=g) < 0.3
    rows = class_rows(logits)
    assert ((rows.amax(1, keepdim=True) - rows) > 88).any()  # some exponentials are subnormal
    check_reference(logits, target, delta, "none", loss_tol=F32, grad_tol=F32)
