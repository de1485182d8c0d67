"""CUDA checks: the losses on the GPU against the CPU reference, and no host synchronisation.

They skip without a CUDA device (CI has none); the Triton kernel's correctness is also checked on
CPU tensors by Triton's interpreter in tests/test_triton_kernel.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_assoftmax.functional import (
    as_softmax_loss_and_stats,
    linear_as_softmax_cross_entropy,
    multilabel_as_softmax_loss,
)
from tests.reference import reference_as_softmax, reference_multilabel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def token_problem(batch=4, length=33, classes=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, classes, generator=g) * 3
    target = torch.randint(0, classes, (batch, length), generator=g)
    flat_l, flat_t = logits.view(-1, classes), target.view(-1)
    confident = torch.arange(len(flat_t)) % 3 == 0
    flat_l[confident, flat_t[confident]] += 15.0
    target[:, -3:] = -100
    return logits, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "tokens"])
def test_single_label_loss_and_gradient_on_cuda(dtype, layout):
    logits, target = token_problem()
    if layout == "rows":
        logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    rounded = logits.to(dtype)
    leaf = rounded.cuda().requires_grad_()
    scores = leaf if layout == "rows" else leaf.transpose(1, 2)
    loss, masked, valid = as_softmax_loss_and_stats(scores, target.cuda(), 0.1, reduction="sum")
    loss.backward()
    ref_leaf = rounded.double().requires_grad_()
    ref_scores = ref_leaf if layout == "rows" else ref_leaf.transpose(1, 2)
    rows = reference_as_softmax(ref_scores, target, 0.1, reduction="none")
    rows.sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double().cpu(), rows.sum().detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad, rtol=tol, atol=tol)
    zero = (rows.detach() == 0) & (target != -100)
    assert masked.item() == zero.sum().item() > 0
    assert valid.item() == (target != -100).sum().item()
    assert (leaf.grad.cpu().reshape(-1, logits.shape[-1])[zero.reshape(-1)] == 0).all()


def test_multilabel_loss_on_cuda():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 30, generator=g) * 3
    target = (torch.rand(64, 30, generator=g) < 0.2).float()
    loss = multilabel_as_softmax_loss(logits.cuda(), target.cuda(), 0.1, reduction="none")
    torch.testing.assert_close(loss.cpu(), reference_multilabel(logits, target, 0.1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_loss_on_cuda(dtype, reduction):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=g).to(dtype)
    w = (torch.randn(5000, 64, generator=g) * 0.3).to(dtype)
    target = torch.randint(0, 5000, (300,), generator=g)
    target[::7] = -100
    xc, wc = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    loss = linear_as_softmax_cross_entropy(xc, wc, target.cuda(), reduction=reduction, chunk_size=64)
    loss.sum().backward()
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference_as_softmax(F.linear(xr, wr), target, 0.1, reduction=reduction)
    ref.sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.detach().double().cpu(), ref.detach(), rtol=tol, atol=tol)
    for got, want in ((xc.grad, xr.grad), (wc.grad, wr.grad)):
        error = (got.double().cpu() - want).abs().max() / want.abs().max()
        assert error < tol


def test_a_training_step_never_synchronises_with_the_host():
    """``torch.cuda.set_sync_debug_mode("error")`` turns any host synchronisation into an error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU()).cuda()
    head = torch.nn.Linear(64, 2000).cuda()
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    x = torch.randn(256, 32, device="cuda")
    target = torch.randint(0, 2000, (256,), device="cuda")
    target[:10] = -100
    multi_target = (torch.rand(256, 2000, device="cuda") < 0.01).float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            hidden = model(x)
            loss, masked, valid = as_softmax_loss_and_stats(head(hidden), target, 0.1)
            loss = loss + multilabel_as_softmax_loss(head(hidden), multi_target, 0.1)
            loss = loss + linear_as_softmax_cross_entropy(hidden, head.weight, target, head.bias)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ratio = masked / valid.clamp(min=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and 0 <= ratio.item() <= 1


def test_compiled_training_step_equals_eager_on_cuda():
    """The custom op (Triton inside) under torch.compile(fullgraph=True), against eager."""
    from lightning_assoftmax.functional import as_softmax_cross_entropy

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(32, 500).cuda()

    x = torch.randn(128, 32, device="cuda")
    target = torch.randint(0, 500, (128,), device="cuda")
    target[:5] = -100

    def step(model, x, target):
        return as_softmax_cross_entropy(model(x) * 4.0, target, 0.1)

    eager_model, compiled_model = make(), make()
    eager = step(eager_model, x, target)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(compiled_model, x, target)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_model.weight.grad, eager_model.weight.grad, rtol=1e-5, atol=1e-6)
