"""DeltaWarmup: the linear r schedule, checked step by step against a hand-written formula."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import TinyClassifier, blobs, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
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


class FailAfterStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("out of memory (simulated)")


def test_a_fit_that_raises_leaves_the_target_delta():
    model = TinyClassifier(delta=0.1)
    t = trainer(max_epochs=3, callbacks=[DeltaWarmup(warmup_fraction=1.0), FailAfterStep(2)], limit_val_batches=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        t.fit(model, loader(blobs(64)))
    assert model.as_softmax_delta == 0.1


def fit_with_checkpoints(tmp_path, max_epochs, warmup, ckpt_path=None):
    model, rec = TinyClassifier(delta=0.1), DeltaRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    t = trainer(max_epochs=max_epochs, callbacks=[warmup, rec, checkpoint], limit_val_batches=0, enable_checkpointing=True)
    t.fit(model, loader(blobs(64)), ckpt_path=ckpt_path)
    return rec.seen


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_resumed_fit_continues_the_warmup_placed_when_training_started(tmp_path):
    # 4 steps per epoch, 3 epochs: the warm-up spans steps 0-12. Resumed after epoch 1 into a
    # longer run (6 epochs), it still ends at step 12, not at 24.
    fit_with_checkpoints(tmp_path, 3, DeltaWarmup(warmup_fraction=1.0))
    seen = fit_with_checkpoints(tmp_path / "resumed", 6, DeltaWarmup(warmup_fraction=1.0), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert [step for step, _ in seen] == list(range(8, 24))
    assert [d for _, d in seen] == pytest.approx([1.0 - 0.9 * min(1.0, step / 12) for step, _ in seen])
    # other settings: the warm-up is placed anew on this run's 24 steps
    with pytest.warns(UserWarning, match="placed anew"):
        seen = fit_with_checkpoints(tmp_path / "changed", 6, DeltaWarmup(warmup_fraction=0.5), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert [d for _, d in seen] == pytest.approx([1.0 - 0.9 * min(1.0, step / 12) for step, _ in seen])
