"""The per-batch path of the mixin and of AdaptiveGradAccumulation reads no tensor value on the host.

On a GPU such a read (``.item()``, ``int(t)``, ``.tolist()``, ``if t:``) waits for the device at
every batch. Without a GPU the same reads are caught by wrapping the ``torch.Tensor`` methods that
perform them while the watched code runs; with CUDA, ``torch.cuda.set_sync_debug_mode("error")``
checks the real thing. The loss computation itself (``lightning_assoftmax.ops``) is outside what is
watched here: only the Lightning glue around it is. AdaptiveGradAccumulation may read once per
optimizer step (its window decision), never per batch.
"""

from __future__ import annotations

import contextlib
import functools

import lightning as L
import pytest
import torch
from helpers import TinyClassifier, blobs, loader
from helpers import trainer as base_trainer

from lightning_assoftmax import AdaptiveGradAccumulation, ASSoftmaxLoss, DeltaWarmup

HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


class HostReads:
    """Records the host reads of tensor values made while a watched function runs."""

    def __init__(self, monkeypatch):
        self.depth = 0
        self.reads: list[tuple[str, str]] = []
        self.where = ""
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))

    def _recording(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.depth:
                self.reads.append((self.where, name))
            return original(tensor, *args, **kwargs)

        return read

    @contextlib.contextmanager
    def watching(self, where: str):
        outer, self.where = self.where, where
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            self.where = outer

    @contextlib.contextmanager
    def paused(self):
        depth, self.depth = self.depth, 0
        try:
            yield
        finally:
            self.depth = depth

    def watch(self, monkeypatch, owner, name: str, where: str | None = None):
        original = getattr(owner, name)

        @functools.wraps(original)
        def watched(*args, **kwargs):
            with self.watching(where or name):
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    def unwatch(self, monkeypatch, owner, name: str):
        original = getattr(owner, name)

        @functools.wraps(original)
        def unwatched(*args, **kwargs):
            with self.paused():
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, unwatched)


class CountsModule(L.LightningModule):
    """No mixin: returns the loss and its counts from ``ASSoftmaxLoss.loss_and_stats``."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 4)
        self.criterion = ASSoftmaxLoss(0.1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, masked, valid = self.criterion.loss_and_stats(self.net(x), y)
        return {"loss": loss, "masked_count": masked, "valid_count": valid}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class StepCounter(L.Callback):
    steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


def watched_fit(monkeypatch, model, reads: HostReads, device: str = "cpu"):
    callback, counter = AdaptiveGradAccumulation(max_accumulate_grad_batches=3), StepCounter()
    for hook in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"):
        reads.watch(monkeypatch, callback, hook)
    if hasattr(model, "as_softmax_loss"):
        reads.watch(monkeypatch, model, "as_softmax_loss")
    criterion = model.as_softmax_criterion if hasattr(model, "as_softmax_criterion") else model.criterion
    for entry in ("loss_and_stats", "loss_and_flags"):  # the loss op: not the glue's business
        reads.unwatch(monkeypatch, criterion, entry)
    callbacks = [callback, counter]
    if hasattr(model, "as_softmax_loss"):
        warmup = DeltaWarmup(0.2)
        reads.watch(monkeypatch, warmup, "on_train_batch_start", "DeltaWarmup.on_train_batch_start")
        callbacks.append(warmup)
    trainer = base_trainer(max_epochs=3, accelerator=device, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(model, loader(blobs(200), batch_size=8))
    return callback, counter


@pytest.mark.parametrize("module", ["mixin", "training_step_output"])
def test_per_batch_path_reads_no_tensor_value_on_the_host(monkeypatch, module):
    reads = HostReads(monkeypatch)
    model = TinyClassifier(lr=0.5) if module == "mixin" else CountsModule()
    callback, counter = watched_fit(monkeypatch, model, reads)
    assert callback.summary()["window_sizes"].keys() >= {2}  # the windows did grow
    # One read per optimizer step: the window decision, after the all-reduce.
    assert reads.reads == [("on_train_batch_end", "tolist")] * counter.steps
    assert counter.steps < callback.summary()["plain_optimizer_steps"]


def test_the_watch_catches_a_host_read(monkeypatch):
    # The instrument itself: a read inside a watched function is recorded, one outside is not.
    reads = HostReads(monkeypatch)
    value = torch.tensor(3)
    int(value)
    with reads.watching("here"):
        int(value)
        bool(value > 1)
        value.item()
    assert reads.reads == [("here", "__int__"), ("here", "__bool__"), ("here", "item")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("module", ["mixin", "training_step_output"])
def test_cuda_per_batch_path_does_not_synchronise(monkeypatch, module):
    # set_sync_debug_mode("error") raises on any synchronising CUDA call (a device-to-host read, a
    # blocking host-to-device copy) while a watched function runs. Left out: the loss op, the
    # once-per-window decision, and the first two batches (the metrics are made at the first one).
    mode = torch.cuda.get_sync_debug_mode()
    batches = [0]

    @contextlib.contextmanager
    def strict():
        if batches[0] < 2:
            yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    @contextlib.contextmanager
    def lenient():
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def wrap(owner, name, context):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with context():
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)

    class CountBatches(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            batches[0] += 1

    model = TinyClassifier(lr=0.5) if module == "mixin" else CountsModule()
    callback = AdaptiveGradAccumulation(max_accumulate_grad_batches=3)
    for hook in ("on_train_batch_start", "on_before_optimizer_step", "_add_micro_batch"):
        wrap(callback, hook, strict)
    callbacks = [callback, CountBatches()]
    if module == "mixin":
        wrap(model, "as_softmax_loss", strict)
        wrap(model.as_softmax_criterion, "loss_and_stats", lenient)
        warmup = DeltaWarmup(0.2)
        wrap(warmup, "on_train_batch_start", strict)
        callbacks.append(warmup)
    trainer = base_trainer(max_epochs=3, accelerator="gpu", callbacks=callbacks, limit_val_batches=0)
    trainer.fit(model, loader(blobs(200), batch_size=8))
    assert batches[0] == 75
    assert set(callback.summary()["window_sizes"]) - {1}  # the windows did grow
