"""The Triton kernel against the plain reference, run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` executes the kernel with NumPy on CPU tensors, so CI checks the CUDA code
path without a GPU (small shapes: the interpreter is slow). On a CUDA machine the same tests run
the compiled kernel.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from tests.reference import reference_as_softmax

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernel():
    """The kernel module (tests/conftest.py turns the interpreter on when there is no GPU)."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set before triton was imported)")
    return importlib.import_module("lightning_assoftmax.ops.triton_single_label")


def reference_rows(logits, target, delta, ignore_index=-100):
    """Per-row loss and gradient of the slow reference (float64), and the masked flags."""
    leaf = logits.detach().double().requires_grad_()
    loss = reference_as_softmax(leaf, target, delta, ignore_index, reduction="none")
    loss.sum().backward()
    valid = target != ignore_index
    return loss.detach(), leaf.grad, valid & (loss.detach() == 0)


def make_rows(rows, classes, seed, scale=3.0, ignore=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=g) * scale
    target = torch.randint(0, classes, (rows,), generator=g)
    # Make some rows confidently correct so that they are masked.
    confident = torch.rand(rows, generator=g) < 0.3
    logits[confident, target[confident]] += 12.0
    if ignore:
        target[torch.rand(rows, generator=g) < ignore] = -100
    return logits, target


@pytest.mark.parametrize("classes", [1, 5, 37, 300])
@pytest.mark.parametrize("delta", [0.0, 0.1, 0.5, 1.0])
def test_matches_reference_float32(kernel, classes, delta):
    logits, target = make_rows(24, classes, seed=classes, ignore=0.15)
    loss, grad, masked = kernel.as_softmax_forward_rows_triton(
        logits.to(DEVICE), target.to(DEVICE), delta, -100, True
    )
    ref_loss, ref_grad, ref_masked = reference_rows(logits, target, delta)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(masked.cpu(), ref_masked)
    # Masked and ignored rows: exact zeros, not round-off.
    zero_rows = ref_masked | (target == -100)
    assert (loss.cpu()[zero_rows] == 0).all() and (grad.cpu()[zero_rows] == 0).all()
    if 0.0 < delta < 1.0 and classes > 1:
        assert ref_masked.any() and not ref_masked.all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decides_in_float32(kernel, dtype):
    logits, target = make_rows(16, 50, seed=7)
    logits = logits.to(dtype)
    loss, grad, masked = kernel.as_softmax_forward_rows_triton(
        logits.to(DEVICE), target.to(DEVICE), 0.1, -100, True
    )
    ref_loss, ref_grad, ref_masked = reference_rows(logits.float(), target, 0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad.to(dtype).double(), rtol=1e-2, atol=1e-2)
    assert torch.equal(masked.cpu(), ref_masked)


def test_blocks_smaller_than_the_row(kernel, monkeypatch):
    """Rows longer than one block: the online max/sum and the block loops."""
    monkeypatch.setattr(kernel, "_MAX_BLOCK", 16)
    logits, target = make_rows(6, 100, seed=3, scale=8.0)
    loss, grad, masked = kernel.as_softmax_forward_rows_triton(logits.to(DEVICE), target.to(DEVICE), 0.05, -100, True)
    ref_loss, ref_grad, ref_masked = reference_rows(logits, target, 0.05)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(masked.cpu(), ref_masked)


def test_strided_rows_and_no_grad(kernel):
    """A transposed view (class stride != 1) and the loss-only launch."""
    logits, target = make_rows(40, 12, seed=5)
    strided = logits.t().contiguous().t()
    assert strided.stride() != logits.stride()
    loss, grad, masked = kernel.as_softmax_forward_rows_triton(strided.to(DEVICE), target.to(DEVICE), 0.1, -100, False)
    ref_loss, _, ref_masked = reference_rows(logits, target, 0.1)
    assert grad.numel() == 0
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(masked.cpu(), ref_masked)


def test_hostile_rows(kernel):
    """NaN and +inf rows give NaN and are never masked; -inf classes are fine; tiny p_t is exact."""
    logits = torch.tensor(
        [
            [float("nan"), 0.0, 1.0],
            [float("inf"), 0.0, 1.0],
            [float("-inf"), 5.0, 0.0],  # target 1, a ruled-out class: masked
            [-200.0, 0.0, 0.0],  # target 0 with p_t ~ e^-200: underflows in float32
            [float("-inf"), float("-inf"), float("-inf")],
        ]
    )
    target = torch.tensor([0, 1, 1, 0, -100])
    loss, grad, masked = kernel.as_softmax_forward_rows_triton(logits.to(DEVICE), target.to(DEVICE), 0.1, -100, True)
    loss, grad, masked = loss.cpu(), grad.cpu(), masked.cpu()
    assert loss[:2].isnan().all() and not masked[:2].any()
    assert loss[2] == 0 and masked[2] and (grad[2] == 0).all()
    expected = torch.logsumexp(torch.tensor([-200.0, 0.0, 0.0], dtype=torch.float64), 0) + 200.0
    torch.testing.assert_close(loss[3].double(), expected, rtol=1e-6, atol=0)
    assert loss[4] == 0 and not masked[4] and (grad[4] == 0).all()


def test_out_of_range_class_reads_nothing_and_gives_nan(kernel):
    if DEVICE == "cuda":
        pytest.skip("on CUDA the launcher's device-side assert fires first (and ends the context)")
    logits, _ = make_rows(3, 4, seed=1)
    target = torch.tensor([1, 4, -3])
    loss, _, masked = kernel.as_softmax_forward_rows_triton(logits.to(DEVICE), target.to(DEVICE), 0.1, -100, True)
    assert torch.isfinite(loss.cpu()[0]) and loss.cpu()[1:].isnan().all() and not masked.cpu().any()


@pytest.mark.parametrize("per_row", [False, True])
def test_gradient_scale_is_applied_as_written(kernel, per_row):
    logits, target = make_rows(12, 30, seed=11, ignore=0.2)
    scale = torch.linspace(0.5, 3.0, 12) if per_row else torch.tensor(0.25)
    _, grad, _ = kernel.as_softmax_forward_rows_triton(
        logits.to(DEVICE), target.to(DEVICE), 0.1, -100, True, grad_scale=scale.to(DEVICE)
    )
    _, ref_grad, _ = reference_rows(logits, target, 0.1)
    expected = ref_grad * (scale.double()[:, None] if per_row else scale.double())
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def op_on_triton(kernel, monkeypatch):
    """The public loss with its custom op dispatching to the Triton kernel (interpreted on CPU)."""
    from lightning_assoftmax.ops import single_label

    monkeypatch.setattr(
        single_label,
        "forward_rows_implementation",
        lambda logits: (
            kernel.as_softmax_forward_rows_triton
            if logits.dtype in kernel.SUPPORTED_DTYPES
            else single_label.as_softmax_forward_rows
        ),
    )


@pytest.mark.parametrize("layout", ["rows", "tokens", "channel_second"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_loss_through_the_kernel(op_on_triton, layout, reduction, dtype):
    """Every layout, reduction and ignore pattern of as_softmax_cross_entropy on the kernel."""
    from lightning_assoftmax.functional import as_softmax_loss_and_stats

    logits, target = make_rows(30, 17, seed=21, ignore=0.2)
    if layout == "tokens":  # (N, L, C) viewed as (N, C, L): class dimension innermost in memory
        logits, target = logits.reshape(3, 10, 17), target.reshape(3, 10)
    elif layout == "channel_second":  # contiguous (N, C, L)
        logits, target = logits.reshape(3, 10, 17).transpose(1, 2).contiguous(), target.reshape(3, 10)
    rounded = logits.to(dtype)
    leaf = rounded.to(DEVICE, copy=True).requires_grad_()
    scores = leaf.transpose(1, 2) if layout == "tokens" else leaf
    loss, masked, valid = as_softmax_loss_and_stats(
        scores, target.to(DEVICE), 0.1, reduction=reduction
    )
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    (loss * upstream.to(DEVICE)).sum().backward()
    ref_leaf = rounded.double().requires_grad_()
    ref_scores = ref_leaf.transpose(1, 2) if layout == "tokens" else ref_leaf
    expected = reference_as_softmax(ref_scores, target, 0.1, reduction=reduction)
    (expected * upstream.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.detach().cpu().double(), expected.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_leaf.grad, rtol=tol, atol=tol)
    rows = reference_as_softmax(ref_scores.detach(), target, 0.1, reduction="none")
    assert masked.item() == ((rows == 0) & (target != -100)).sum().item() > 0
    assert valid.item() == (target != -100).sum().item()


def target_layout(target, layout):
    """``target`` ``(M,)`` in another memory layout (the same values, but for ``expanded``: class
    2 everywhere)."""
    if layout == "column":  # labels[:, 0] of a (M, 2) label tensor: stride 2
        return torch.stack([target, torch.full_like(target, 7)], 1)[:, 0]
    if layout == "expanded":  # one class for every row: stride 0
        return torch.full_like(target[:1], 2).expand(len(target))
    if layout == "int32":
        return target.int()
    if layout == "offset":  # a slice starting inside its storage
        return torch.cat([torch.full_like(target, 5), target])[len(target):]
    return target


@pytest.mark.parametrize("layout", ["column", "expanded", "int32", "offset"])
def test_target_is_read_through_its_strides(kernel, layout):
    """A sliced, expanded or int32 target reads the classes it shows (stride 0 and 2 included)."""
    logits, target = make_rows(20, 9, seed=13, ignore=0.2)
    laid_out = target_layout(target, layout)
    values = laid_out.long().contiguous()
    loss, grad, masked = kernel.as_softmax_forward_rows_triton(
        logits.to(DEVICE), laid_out.to(DEVICE), 0.2, -100, True
    )
    ref_loss, ref_grad, ref_masked = reference_rows(logits, values, 0.2)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(masked.cpu(), ref_masked)


def test_expanded_logits_and_strided_scale(kernel):
    """Every tensor argument through its strides: stride-0 rows of logits, a strided scale."""
    logits, target = make_rows(1, 11, seed=17)
    expanded = logits.expand(6, 11)
    target = torch.tensor([0, 3, 3, 10, -100, 5])
    scale = torch.linspace(0.5, 3.0, 12)[::2]
    _, grad, masked = kernel.as_softmax_forward_rows_triton(
        expanded.to(DEVICE), target.to(DEVICE), 0.1, -100, True, grad_scale=scale.to(DEVICE)
    )
    _, ref_grad, ref_masked = reference_rows(expanded.contiguous(), target, 0.1)
    torch.testing.assert_close(grad.cpu().double(), ref_grad * scale.double()[:, None], rtol=1e-5, atol=1e-6)
    assert torch.equal(masked.cpu(), ref_masked)


def test_launcher_refuses_a_target_of_another_length(kernel):
    logits, target = make_rows(4, 5, seed=1)
    with pytest.raises(ValueError, match=r"target must be \(4,\)"):
        kernel.as_softmax_forward_rows_triton(logits.to(DEVICE), target[:3].to(DEVICE), 0.1, -100, False)


@pytest.mark.parametrize("layout", ["column", "expanded", "int32"])
def test_public_and_fused_losses_take_a_sliced_target_on_the_kernel(op_on_triton, monkeypatch, layout):
    """What the user writes (``labels[:, 0]``) reaches the kernel unchanged: the public loss and
    the fused layer (whose chunks are slices of the flat target)."""
    from lightning_assoftmax.functional import (
        as_softmax_cross_entropy,
        linear_as_softmax_cross_entropy,
    )
    from lightning_assoftmax.ops import linear_single_label, single_label

    logits, target = make_rows(12, 6, seed=29, ignore=0.2)
    laid_out = target_layout(target, layout)
    values = laid_out.long().contiguous()
    leaf = logits.to(DEVICE, copy=True).requires_grad_()
    loss = as_softmax_cross_entropy(leaf, laid_out.to(DEVICE), 0.3, reduction="sum")
    loss.backward()
    ref_leaf = logits.double().requires_grad_()
    expected = reference_as_softmax(ref_leaf, values, 0.3, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss.detach().cpu().double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_leaf.grad, rtol=1e-5, atol=1e-6)

    # The fused layer on the kernel too; its chunks are slices of the flat target.
    monkeypatch.setattr(linear_single_label, "forward_rows_implementation", single_label.forward_rows_implementation)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(12, 4, generator=g), torch.randn(6, 4, generator=g)
    fused = linear_as_softmax_cross_entropy(x.to(DEVICE), w.to(DEVICE), laid_out.to(DEVICE), None, 0.3, chunk_size=5)
    ref = reference_as_softmax(x.double() @ w.double().t(), values, 0.3)
    torch.testing.assert_close(fused.cpu().double(), ref, rtol=1e-5, atol=1e-5)
