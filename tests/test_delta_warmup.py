"""DeltaWarmup: the linear r schedule, checked step by step against a hand-written formula."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import TinyClassifier, blobs, loader, trainer
from torch import nn

from lightning_assoftmax import DeltaWarmup
from lightning_assoftmax.functional import as_softmax_cross_entropy


class DeltaRecorder(L.Callback):
    """Records (global_step, training delta) as the loss sees it (after DeltaWarmup ran)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step - 1, pl_module.as_softmax_delta))


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_linear_schedule(fraction):
    model = TinyClassifier(delta=0.1)
    rec = DeltaRecorder()
    # 64 samples / 16 = 4 steps per epoch, 3 epochs -> 12 optimizer steps.
    t = trainer(max_epochs=3, callbacks=[DeltaWarmup(warmup_fraction=fraction), rec], limit_val_batches=0)
    t.fit(model, loader(blobs(64)))
    warm = fraction * 12
    expected = [1.0 + (0.1 - 1.0) * min(1.0, step / warm) for step, _ in rec.seen]
    assert [d for _, d in rec.seen] == pytest.approx(expected)
    assert rec.seen[0][1] == 1.0
    assert model.as_softmax_delta == 0.1  # restored to the target after fit


def test_zero_fraction_is_no_warmup():
    model = TinyClassifier(delta=0.2)
    rec = DeltaRecorder()
    t = trainer(max_epochs=1, callbacks=[DeltaWarmup(warmup_fraction=0.0), rec], limit_val_batches=0)
    t.fit(model, loader(blobs(32)))
    assert {d for _, d in rec.seen} == {0.2}


def test_validation_uses_target_delta_during_warmup():
    seen = []

    class ValDelta(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append(pl_module.as_softmax_delta)

    model = TinyClassifier(delta=0.1)
    data = blobs(32)
    t = trainer(max_epochs=2, callbacks=[DeltaWarmup(warmup_fraction=1.0), ValDelta()], num_sanity_val_steps=0)
    t.fit(model, loader(data), loader(data))
    # Mid-warm-up the training delta is above the target; the validation loss is still logged with
    # the target delta, so val/loss equals the functional value at delta=0.1.
    assert max(seen) > 0.1
    x, y = data.tensors
    with torch.no_grad():
        expected = as_softmax_cross_entropy(model(x), y, 0.1)
    torch.testing.assert_close(t.callback_metrics["val/loss"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_fraction(bad):
    with pytest.raises(ValueError, match="warmup_fraction must lie in"):
        DeltaWarmup(warmup_fraction=bad)


def test_module_without_mixin_is_refused():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 4)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="DeltaWarmup needs a LightningModule that uses ASSoftmaxMixin"):
        trainer(callbacks=[DeltaWarmup()]).fit(Plain(), loader(blobs(16)))


def test_infinite_training_is_refused():
    t = trainer(max_epochs=-1, max_steps=-1, callbacks=[DeltaWarmup(0.1)], limit_val_batches=0)
    with pytest.raises(ValueError, match="finite training length"):
        t.fit(TinyClassifier(), loader(blobs(16)))
