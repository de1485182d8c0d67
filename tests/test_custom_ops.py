"""The loss ops as ``torch.library`` custom ops: opcheck, torch.compile(fullgraph=True) of a
training step against eager mode, no host-device synchronisation, the backward's contract.

References here are the eager results of the same public functions (the eager results are tested
against independent references in test_fused_loss.py and test_functional.py); what these tests
add is that compiled and eager agree, and that nothing reads a tensor value on the host.
"""

from __future__ import annotations

import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import saved_bytes

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_loss_and_stats,
    masked_sample_ratio,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)
from lightning_assoftmax.ops import (
    as_softmax_forward_rows,
    as_softmax_rows,
    multilabel_as_softmax_forward_rows,
    multilabel_as_softmax_rows,
)
from lightning_assoftmax.ops import single_label as single_label_ops


def _single(n: int, c: int, dtype=torch.float32, seed: int = 0, ignore: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) * 3
    logits[torch.arange(n), target] += torch.rand(n, generator=g) * 8
    target[torch.rand(n, generator=g) < ignore] = -100
    return logits.to(dtype), target


def _multi(n: int, c: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, c, generator=g) < 0.3).float()
    logits = torch.randn(n, c, generator=g) * 3 + target * 4
    return logits.to(dtype), target


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("num_classes", [5, 40])  # class-major and row-major buffers on CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_single_label_opcheck(num_classes, dtype):
    logits, target = _single(24, num_classes, dtype)
    # test_aot_dispatch_dynamic compares the op's outputs after an eager backward, which scales
    # the saved gradient (an output, dropped by every caller) in place by the upstream gradient
    # and its row factor; compiled and eager training are compared by the compile tests below.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for need_grad in (True, False):
        args = (logits.clone().requires_grad_(need_grad), target, 0.1, -100, need_grad)
        torch.library.opcheck(as_softmax_rows, args, test_utils=checks)


@pytest.mark.parametrize("num_classes", [5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_multilabel_opcheck(num_classes, dtype):
    logits, target = _multi(24, num_classes, dtype)
    for need_grad in (True, False):
        for labels in (target, target.bool()):
            args = (logits.clone().requires_grad_(need_grad), labels, 0.1, need_grad)
            torch.library.opcheck(multilabel_as_softmax_rows, args)


# --------------------------------------------------------------------------- torch.compile


def _train(step_loss, compile_backend: str | None, steps: int = 3, seed: int = 0):
    """A Linear layer trained for ``steps`` SGD steps on ``step_loss(model, x)``; the forward
    (model and loss) is compiled with fullgraph=True when ``compile_backend`` is given."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(12, 7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(48, 12)
    fn = step_loss
    if compile_backend is not None:
        torch._dynamo.reset()
        fn = torch.compile(step_loss, fullgraph=True, backend=compile_backend)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = fn(model, x)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def _assert_same_training(step_loss, backend: str = "aot_eager"):
    eager_losses, eager_params = _train(step_loss, None)
    compiled_losses, compiled_params = _train(step_loss, backend)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert bool(eager_losses.isfinite().all())


_TARGET = torch.randint(0, 7, (48,), generator=torch.Generator().manual_seed(5))
_TARGET_IGNORED = _TARGET.masked_fill(torch.arange(48) % 5 == 0, -100)
_TARGET_IGNORED_1 = _TARGET.masked_fill(torch.arange(48) % 5 == 0, 1)
_WEIGHTS = torch.rand(48, generator=torch.Generator().manual_seed(6))
_LABELS = (torch.rand(48, 7, generator=torch.Generator().manual_seed(7)) < 0.3).float()


@pytest.mark.parametrize(
    "case",
    [
        "mean",
        "sum",
        "none-weighted",
        "ignore_index=1",
        "all-ignored",
        "tokens (N, L, C).transpose(1, 2)",
        "stats",
    ],
)
def test_single_label_training_step_compiles_and_equals_eager(case):
    def step_loss(model, x):
        logits = model(x) * 3
        if case == "mean":
            return as_softmax_cross_entropy(logits, _TARGET_IGNORED, 0.1)
        if case == "sum":
            return as_softmax_cross_entropy(logits, _TARGET_IGNORED, 0.1, reduction="sum") / 48
        if case == "none-weighted":
            rows = as_softmax_cross_entropy(logits, _TARGET_IGNORED, 0.1, reduction="none")
            return (rows * _WEIGHTS).mean()
        if case == "ignore_index=1":
            return as_softmax_cross_entropy(logits, _TARGET_IGNORED_1, 0.2, ignore_index=1)
        if case == "all-ignored":  # loss 0, zero gradient, still a working backward
            return as_softmax_cross_entropy(logits, torch.full_like(_TARGET, -100), 0.1)
        if case == "stats":
            loss, masked, valid = as_softmax_loss_and_stats(logits, _TARGET_IGNORED, 0.1)
            return loss + 0 * (masked + valid)
        tokens = logits.view(6, 8, 7).transpose(1, 2)  # (N, C, L), class dim innermost in memory
        return as_softmax_cross_entropy(tokens, _TARGET_IGNORED.view(6, 8), 0.1)

    _assert_same_training(step_loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multilabel_training_step_compiles_and_equals_eager(reduction):
    def step_loss(model, x):
        loss = multilabel_as_softmax_loss(model(x) * 3, _LABELS, 0.1, reduction=reduction)
        return loss.mean() if reduction == "none" else loss

    _assert_same_training(step_loss)


def test_one_graph_no_break():
    """The issue's check: dynamo.explain of a call used to show 3 graphs and 2 breaks."""
    logits, target = _single(32, 5)
    leaf = logits.requires_grad_()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(as_softmax_cross_entropy)(leaf, target, 0.1)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    ml_logits, labels = _multi(32, 6)
    explained = torch._dynamo.explain(multilabel_as_softmax_loss)(ml_logits, labels, 0.1)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch's inductor backend needs a C++ compiler on CPU")
def test_training_step_compiles_with_inductor():
    def step_loss(model, x):
        logits = model(x) * 3
        return as_softmax_cross_entropy(logits, _TARGET_IGNORED, 0.1) + multilabel_as_softmax_loss(
            logits, _LABELS, 0.1
        )

    _assert_same_training(step_loss, backend="inductor")


def test_bad_class_index_is_reported_under_compile():
    logits, target = _single(8, 5, ignore=0.0)
    target[3] = 5
    torch._dynamo.reset()
    compiled = torch.compile(as_softmax_cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="class index 5, outside"):
        compiled(logits, target, 0.1)


# --------------------------------------------------------------------------- no host sync


def test_losses_never_read_a_tensor_value():
    """Meta tensors have no values: any .item(), bool(), int(), float(), .tolist() or
    data-dependent shape in the losses (wrappers, ops and their backward) raises here."""
    logits, target = _single(16, 5)
    meta_logits = logits.to("meta").requires_grad_()
    meta_target = target.to("meta")
    for reduction in ("mean", "sum", "none"):
        loss = as_softmax_cross_entropy(meta_logits, meta_target, 0.1, reduction=reduction)
        loss.sum().backward()
        ml = multilabel_as_softmax_loss(meta_logits, meta_target.new_zeros(16, 5), 0.1,
                                        reduction=reduction)
        ml.sum().backward()
    assert meta_logits.grad.device.type == "meta"
    tokens = torch.empty(2, 9, 40, device="meta").transpose(1, 2).requires_grad_()
    as_softmax_cross_entropy(tokens, torch.empty(2, 9, dtype=torch.long, device="meta")).backward()
    _, masked, valid = as_softmax_loss_and_stats(meta_logits, meta_target, 0.1)
    assert masked.device.type == valid.device.type == "meta"
    masked_sample_ratio(meta_logits, meta_target, 0.1)
    multilabel_as_softmax_loss_and_stats(meta_logits, torch.empty(16, 5, device="meta"), 0.1)


@pytest.mark.parametrize("num_classes", [5, 40])
def test_torch_implementations_trace_without_host_reads(num_classes):
    """The op bodies themselves (what runs on GPUs without the Triton kernel) on meta tensors."""
    logits = torch.empty(16, num_classes, device="meta")
    target = torch.empty(16, dtype=torch.long, device="meta")
    loss, grad, masked = as_softmax_forward_rows(logits, target, 0.1, -100, True)
    assert loss.shape == masked.shape == (16,) and grad.shape == (16, num_classes)
    loss, grad, masked = multilabel_as_softmax_forward_rows(logits, torch.empty_like(logits), 0.1, True)
    assert loss.shape == masked.shape == (16,) and grad.shape == (16, num_classes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_never_synchronises():
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 300).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256, 32, device="cuda")
    target = torch.randint(0, 300, (256,), device="cuda")
    target[::7] = -100
    labels = (torch.rand(256, 300, device="cuda") < 0.1).float()
    for checked in (False, True):  # the first step initialises lazily (cuBLAS handles, ...)
        torch.cuda.set_sync_debug_mode("error" if checked else 0)
        try:
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss, masked, valid = as_softmax_loss_and_stats(logits, target, 0.1)
            loss = loss + multilabel_as_softmax_loss(logits, labels, 0.1)
            loss.backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and valid.item() == int((target != -100).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_runs_the_triton_kernel_where_it_imports(monkeypatch):
    calls = []

    def fake_kernel(logits, target, delta, ignore_index, need_grad):
        calls.append(logits.dtype)
        return as_softmax_forward_rows(logits, target, delta, ignore_index, need_grad)

    module = types.ModuleType("lightning_assoftmax.ops.triton_single_label")
    module.as_softmax_forward_rows_triton = fake_kernel
    monkeypatch.setitem(sys.modules, module.__name__, module)
    single_label_ops._triton_single_label.cache_clear()
    try:
        logits, target = _single(64, 30)
        as_softmax_cross_entropy(logits.cuda(), target.cuda(), 0.1)
        as_softmax_cross_entropy(logits.double().cuda(), target.cuda(), 0.1)  # not a kernel dtype
    finally:
        single_label_ops._triton_single_label.cache_clear()
    assert calls == [torch.float32]


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("loss_name", ["single", "multi"])
def test_double_backward_raises_a_clear_error(loss_name):
    logits, target = _single(10, 6)
    leaf = logits.requires_grad_()
    if loss_name == "single":
        loss = as_softmax_cross_entropy(leaf, target, 0.1)
    else:
        loss = multilabel_as_softmax_loss(leaf, (torch.rand(10, 6) < 0.3).float(), 0.1)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, leaf, create_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_classes", [5, 40])
def test_retain_graph_and_repeated_backward(reduction, num_classes):
    """Backward scales the saved gradient in place only when the graph is freed afterwards."""
    logits, target = _single(30, num_classes)
    ml_logits, labels = _multi(30, num_classes)
    for fn, z in (
        (lambda z: as_softmax_cross_entropy(z, target, 0.1, reduction=reduction), logits),
        (lambda z: multilabel_as_softmax_loss(z, labels, 0.1, reduction=reduction), ml_logits),
    ):
        leaf = z.clone().requires_grad_()
        loss = fn(leaf)
        weights = torch.rand(loss.shape) if reduction == "none" else torch.tensor(1.3)
        (first,) = torch.autograd.grad(loss, leaf, weights, retain_graph=True)
        (second,) = torch.autograd.grad(loss, leaf, weights * 2, retain_graph=True)
        (third,) = torch.autograd.grad(loss, leaf, weights)
        torch.testing.assert_close(second, 2 * first, rtol=1e-6, atol=0)
        torch.testing.assert_close(third, first, rtol=0, atol=0)
        fresh = z.clone().requires_grad_()
        (expected,) = torch.autograd.grad(fn(fresh), fresh, weights)
        torch.testing.assert_close(first, expected, rtol=0, atol=0)


def test_backward_allocates_no_second_gradient():
    """Without retain_graph the gradient handed to autograd is the buffer the forward saved."""
    logits, target = _single(64, 40)
    leaf = logits.requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.shape, t.data_ptr()))  # no reference: autograd may steal the buffer
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = as_softmax_cross_entropy(leaf, target, 0.1, reduction="sum")
    buffer = next(ptr for shape, ptr in saved if shape == leaf.shape)
    loss.backward()
    assert leaf.grad.data_ptr() == buffer


def test_saved_bytes_no_more_than_cross_entropy_across_shapes_and_layouts():
    for n, c in [(512, 5), (64, 300), (16, 2000)]:
        logits, target = _single(n, c)
        leaf = logits.requires_grad_()
        for reduction in ("mean", "sum", "none"):
            ours = saved_bytes(
                lambda z=leaf, t=target, r=reduction: as_softmax_cross_entropy(z, t, 0.1, reduction=r)
            )
            ce = saved_bytes(lambda z=leaf, t=target, r=reduction: F.cross_entropy(z, t, reduction=r))
            assert ours <= ce, (n, c, reduction, ours, ce)
    tokens = torch.randn(4, 16, 300).requires_grad_()
    token_target = torch.randint(0, 300, (4, 16))
    ours = saved_bytes(lambda: as_softmax_cross_entropy(tokens.transpose(1, 2), token_target, 0.1))
    ce = saved_bytes(lambda: F.cross_entropy(tokens.transpose(1, 2), token_target))
    assert ours <= ce
