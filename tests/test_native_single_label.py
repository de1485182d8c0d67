"""The compiled C kernel of the single-label loss against the torch implementation (which the
reference tests in test_fused_loss.py check on both paths): same losses, gradients, validity and
masked rows on mixed, hostile and multi-threaded inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import count_calls

from lightning_assoftmax.functional import as_softmax_loss_and_stats
from lightning_assoftmax.ops import _native
from lightning_assoftmax.ops import single_label as sl_ops

pytestmark = pytest.mark.skipif(
    _native.native_library() is None, reason="no C compiler: the compiled kernels are unavailable"
)
TOL = dict(rtol=2e-5, atol=2e-6)


def data(shape, num_classes, seed, ignore=0.2, hostile=False):
    """Logits ``(N, C, *rest)`` and targets mixing masked, partly masked, unmasked and ignored
    rows; with ``hostile``, also NaN rows, +inf rows, -inf logits and an ignored NaN row."""
    g = torch.Generator().manual_seed(seed)
    n, rest = shape[0], tuple(shape[1:])
    target = torch.randint(0, num_classes, (n, *rest), generator=g)
    z = torch.randn(n, *rest, num_classes, generator=g) * 3
    boost = torch.rand(n, *rest, generator=g) * 12
    z.scatter_add_(-1, target.unsqueeze(-1), boost.unsqueeze(-1))
    target[torch.rand(target.shape, generator=g) < ignore] = -100
    if hostile:
        rows = z.reshape(-1, num_classes)
        flat_target = target.reshape(-1)
        rows[1, 0] = math.nan
        rows[2, -1] = math.inf
        rows[3, : max(num_classes - 1, 1)] = -math.inf  # only the last class finite
        rows[4] = rows[4] * 40  # spread past float's exponent range
        flat_target[5] = -100
        rows[5, 0] = math.nan  # ignored rows never reach the loss or the gradient
    return z.movedim(-1, 1).contiguous(), target


def run(logits, target, delta, native: bool, monkeypatch):
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_NATIVE", "1" if native else "0")
    with monkeypatch.context() as patch:
        calls = count_calls(patch, sl_ops, "_torch_forward")
        leaf = logits.detach().clone().requires_grad_()
        loss, masked, count = as_softmax_loss_and_stats(leaf, target, delta, reduction="none")
        weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        (loss * weights).nan_to_num(0.0).sum().backward()
    assert bool(calls) != native  # the torch path ran exactly when asked for
    return loss.detach(), leaf.grad, masked, count


@pytest.mark.parametrize(
    ("shape", "num_classes"),
    [
        ((300,), 2),
        ((300,), 5),
        ((200,), 31),
        ((100,), 127),
        ((100,), 128),
        ((100,), 129),
        ((40,), 700),
        ((3, 70), 5),  # channel-second, few classes
        ((2, 130), 40),  # channel-second, contiguous samples
        ((2, 3, 4), 150),
    ],
)
@pytest.mark.parametrize("delta", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("hostile", [False, True])
def test_c_and_torch_paths_agree(monkeypatch, shape, num_classes, delta, hostile):
    logits, target = data(shape, num_classes, seed=num_classes, hostile=hostile)
    c_loss, c_grad, c_masked, c_count = run(logits, target, delta, True, monkeypatch)
    t_loss, t_grad, t_masked, t_count = run(logits, target, delta, False, monkeypatch)
    torch.testing.assert_close(c_loss, t_loss, **TOL, equal_nan=True)
    torch.testing.assert_close(c_grad, t_grad, **TOL, equal_nan=True)
    # The same rows are masked (loss exactly 0) and counted, on both paths.
    assert torch.equal(c_loss == 0, t_loss == 0)
    assert (c_masked, c_count) == (t_masked, t_count)
    valid = target != -100
    assert (c_loss[~valid] == 0).all() and (c_grad.movedim(1, -1)[~valid] == 0).all()
    if delta == 1.0 and not hostile:  # delta = 1 keeps every class: cross entropy
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        torch.testing.assert_close(c_loss, ce, **TOL)


def test_token_logits_and_non_contiguous_views(monkeypatch):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(4, 33, 50, generator=g) * 3  # (N, L, C)
    target = torch.randint(0, 50, (4, 33), generator=g)
    wide = torch.randn(64, 20, generator=g) * 3
    cases = [(tokens.transpose(1, 2), target), (wide[:, ::2], target.reshape(-1)[:64] % 10)]
    for logits, tgt in cases:
        c = run(logits, tgt, 0.1, True, monkeypatch)
        t = run(logits, tgt, 0.1, False, monkeypatch)
        for a, b in zip(c[:2], t[:2], strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(("rows", "num_classes"), [(120000, 5), (4099, 150), (300, 2000)])
def test_threads_split_rows_with_identical_results(monkeypatch, rows, num_classes):
    logits, target = data((rows,), num_classes, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(logits, target, 0.1, True, monkeypatch)
        torch.set_num_threads(2)
        two = run(logits, target, 0.1, True, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert rows * num_classes >= 2 * _native.PARALLEL_ELEMENTS  # really split over 2 threads
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_minus_inf_target_logit_is_infinite_and_masked_rows_exact(monkeypatch):
    logits = torch.tensor([[-math.inf, 1.0, 0.0], [9.0, -9.0, -9.0], [-2.0, 1.9, 2.0]])
    target = torch.tensor([0, 0, 2])
    loss, grad, masked, count = run(logits, target, 0.1, True, monkeypatch)
    assert loss[0] == math.inf
    assert loss[1] == 0 and (grad[1] == 0).all()  # confident: only the target kept
    assert masked == 1 and count == 3
    # The unmasked row against a hand computation: classes 1 and 2 kept (p_1 >= p_2 - 0.1).
    p = torch.softmax(logits[2].double(), 0)
    kept = p >= p[2] - 0.1
    assert kept.tolist() == [False, True, True]
    expected = math.log(p[kept].sum()) - math.log(p[2])
    assert loss[2].item() == pytest.approx(expected, rel=1e-6)


def test_channel_second_logits_with_many_classes_stay_on_the_torch_path(monkeypatch):
    """(N, C, L) logits with more than MAX_STRIDED_CLASSES classes would be read one cache line
    per element by the kernel; they run through the torch implementation (same results)."""
    num_classes = _native.MAX_STRIDED_CLASSES + 1
    logits, target = data((1, 70), num_classes, seed=11)
    calls = count_calls(monkeypatch, sl_ops, "_torch_forward")
    leaf = logits.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    got = as_softmax_loss_and_stats(leaf, target, 1.0, reduction="none")[0]
    assert calls  # the torch path ran
    # Sums of 4097 float32 probabilities: a few 1e-5 of absolute rounding next to cross entropy.
    torch.testing.assert_close(got, loss, rtol=1e-4, atol=5e-5)
