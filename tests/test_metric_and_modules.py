"""MaskedSampleRatio and the nn.Module losses against the reference, including a 2-process sync."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import reference_as_softmax, reference_keep_mask, reference_multilabel

from lightning_assoftmax import ASSoftmaxLoss, MaskedSampleRatio, MultiLabelASSoftmaxLoss


def _alone_count(logits, target, delta, ignore_index=-100):
    valid = target != ignore_index
    keep = reference_keep_mask(logits[valid], target[valid], delta)
    return int((keep.sum(dim=1) == 1).sum()), int(valid.sum())


def test_metric_accumulates_counts_not_batch_ratios():
    metric = MaskedSampleRatio(delta=0.2)
    masked = total = 0
    for n in (3, 17, 40):
        logits = torch.randn(n, 4) * 3
        target = torch.randint(4, (n,))
        target[::5] = -100
        metric.update(logits, target)
        m, t = _alone_count(logits, target, 0.2)
        masked += m
        total += t
    assert metric.compute().item() == pytest.approx(masked / total)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().item() == 0.0


def test_metric_multilabel():
    logits = torch.tensor([[6.0, -6.0], [0.1, 0.0]])
    target = torch.tensor([[1, 0], [1, 0]])
    metric = MaskedSampleRatio(delta=0.1, multilabel=True)
    metric.update(logits, target)
    expected = (reference_multilabel(logits, target, 0.1) == 0).float().mean()
    assert metric.compute().item() == pytest.approx(expected.item())


def test_loss_modules_match_reference():
    logits = torch.randn(10, 6, 3)
    target = torch.randint(6, (10, 3))
    target[0] = -100
    for reduction in ("mean", "sum", "none"):
        criterion = ASSoftmaxLoss(delta=0.15, reduction=reduction)
        torch.testing.assert_close(criterion(logits, target), reference_as_softmax(logits, target, 0.15, reduction=reduction))
    ml_logits = torch.randn(7, 5)
    ml_target = (torch.rand(7, 5) < 0.4).long()
    torch.testing.assert_close(
        MultiLabelASSoftmaxLoss(0.1)(ml_logits, ml_target), reference_multilabel(ml_logits, ml_target, 0.1).mean()
    )
    assert "delta=0.15" in repr(ASSoftmaxLoss(delta=0.15))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        logits = torch.randn(8 + 13 * rank, 5, generator=gen) * 3
        target = torch.randint(5, (8 + 13 * rank,), generator=gen)
        metric = MaskedSampleRatio(delta=0.1)
        metric.update(logits, target)
        # Plain lists: tensors sent through a queue vanish with the process that shared them.
        queue.put((rank, metric.compute().item(), logits.tolist(), target.tolist()))
    finally:
        dist.destroy_process_group()


def test_metric_syncs_across_two_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ordered = sorted(results, key=lambda r: r[0])
    logits = torch.tensor([row for r in ordered for row in r[2]])
    target = torch.tensor([t for r in ordered for t in r[3]])
    masked, total = _alone_count(logits, target, 0.1)
    for _, value, _, _ in results:
        assert value == pytest.approx(masked / total)

