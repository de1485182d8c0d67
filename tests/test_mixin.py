"""ASSoftmaxMixin inside a real Trainer: logged keys and values against independent computations."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, blobs, loader, trainer
from reference import reference_as_softmax, reference_multilabel
from torch import nn

from lightning_assoftmax import ASSoftmaxMixin


def test_fit_logs_keys_that_agree_with_independent_values():
    torch.manual_seed(0)
    model = TinyClassifier()
    val = blobs(70, seed=1, ignore_share=0.2)  # 70 = 16 * 4 + 6: uneven batches and ignored rows
    t = trainer(max_epochs=3, num_sanity_val_steps=2)
    t.fit(model, loader(blobs(96)), loader(val))
    metrics = t.callback_metrics
    for key in ("train/loss", "train/masked_ratio", "val/loss", "val/masked_ratio", "val/ce_loss", "val/acc"):
        assert key in metrics, key
    x, y = val.tensors
    with torch.no_grad():
        logits = model(x)
    valid = y != -100
    expected_loss = reference_as_softmax(logits, y, 0.1)
    expected_ce = F.cross_entropy(logits, y)
    as_rows = reference_as_softmax(logits, y, 0.1, reduction="none")
    expected_ratio = ((as_rows == 0) & valid).sum() / valid.sum()
    expected_acc = ((logits.argmax(1) == y) & valid).sum() / valid.sum()
    torch.testing.assert_close(metrics["val/loss"], expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["val/ce_loss"], expected_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["val/masked_ratio"], expected_ratio.float())
    torch.testing.assert_close(metrics["val/acc"], expected_acc.float())
    assert 0 < float(metrics["val/masked_ratio"]) <= 1  # blobs become confident fast

    test_metrics = t.test(model, loader(val), verbose=False)[0]
    assert test_metrics["test/loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert test_metrics["test/acc"] == pytest.approx(expected_acc.item())


def test_train_epoch_masked_ratio_is_exact_over_the_epoch():
    class Recorder(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            x, y = batch
            with torch.no_grad():
                self.rows.append(reference_as_softmax(pl_module(x), y, pl_module.as_softmax_delta, reduction="none"))

    # lr=0 keeps weights fixed so the recorded per-batch values are those the module saw.
    model = TinyClassifier(lr=0.0)
    rec = Recorder()
    t = trainer(max_epochs=1, callbacks=[rec], limit_val_batches=0)
    t.fit(model, loader(blobs(50)))
    rows = torch.cat(rec.rows)
    torch.testing.assert_close(t.callback_metrics["train/masked_ratio_epoch"], (rows == 0).float().mean())
    torch.testing.assert_close(t.callback_metrics["train/loss_epoch"], rows.mean())


def test_save_hyperparameters_records_subclass_arguments():
    model = TinyClassifier(in_features=8, num_classes=4, lr=0.01, delta=0.25)
    assert dict(model.hparams) == {"in_features": 8, "num_classes": 4, "lr": 0.01, "delta": 0.25}
    assert model.as_softmax_delta == 0.25 and model.as_softmax_target_delta == 0.25


def test_checkpoint_roundtrip_keeps_delta(tmp_path):
    model = TinyClassifier(delta=0.3)
    t = trainer(max_epochs=1, default_root_dir=tmp_path, limit_val_batches=0)
    t.fit(model, loader(blobs(32)))
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    restored = TinyClassifier.load_from_checkpoint(path)
    assert restored.as_softmax_delta == 0.3
    torch.testing.assert_close(restored.net.weight, model.net.weight)


def test_standalone_call_without_trainer():
    model = TinyClassifier()
    x, y = blobs(10).tensors
    loss = model.as_softmax_loss(model(x), y)
    torch.testing.assert_close(loss, reference_as_softmax(model(x).detach(), y, 0.1))
    assert model.as_softmax_last_stats is None


def test_mixin_must_come_first():
    with pytest.raises(TypeError, match=r"list ASSoftmaxMixin before LightningModule"):

        class Wrong(L.LightningModule, ASSoftmaxMixin):
            pass


def test_bad_delta_in_module():
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\], got 1.5"):
        TinyClassifier(delta=1.5)


class TinyMultiLabel(ASSoftmaxMixin, L.LightningModule):
    def __init__(self, delta: float = 0.1):
        super().__init__(delta=delta, multilabel=True)
        self.net = nn.Linear(6, 5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.as_softmax_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.as_softmax_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_multilabel_mixin_in_fit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    y = (x[:, :5] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    model = TinyMultiLabel()
    t = trainer(max_epochs=3)
    t.fit(model, loader(data), loader(data))
    with torch.no_grad():
        logits = model.net(x)
    rows = reference_multilabel(logits, y, 0.1)
    torch.testing.assert_close(t.callback_metrics["val/loss"], rows.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.callback_metrics["val/masked_ratio"], (rows == 0).float().mean())
    torch.testing.assert_close(t.callback_metrics["val/ce_loss"], reference_multilabel(logits, y, 1.0).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.callback_metrics["val/acc"], ((logits > 0) == (y > 0)).float().mean())


# -- several evaluation dataloaders ------------------------------------------------------------
def expected_values(logits: torch.Tensor, y: torch.Tensor, delta: float = 0.1) -> dict[str, torch.Tensor]:
    """The four evaluation values of one dataloader, from plain PyTorch on all of its samples."""
    valid = y != -100
    rows = reference_as_softmax(logits, y, delta, reduction="none")
    return {
        "loss": reference_as_softmax(logits, y, delta),
        "ce_loss": F.cross_entropy(logits, y),
        "masked_ratio": (((rows == 0) & valid).sum() / valid.sum()).float(),
        "acc": (((logits.argmax(1) == y) & valid).sum() / valid.sum()).float(),
    }


class MultiLoaderClassifier(TinyClassifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        super().test_step(batch, batch_idx)


def test_each_validation_and_test_dataloader_gets_its_own_exact_metrics():
    # The same 64 inputs twice: with their true labels and with all-zero labels. Batches of 24
    # (24, 24, 16) make a plain mean of batch values differ from the exact epoch value.
    torch.manual_seed(0)
    val = blobs(64, seed=1, ignore_share=0.1)
    x, y = val.tensors
    zeros = torch.utils.data.TensorDataset(x, torch.where(y == -100, y, torch.zeros_like(y)))
    model = MultiLoaderClassifier()
    t = trainer(max_epochs=2, num_sanity_val_steps=0)
    t.fit(model, loader(blobs(96)), [loader(val, 24), loader(zeros, 24)])
    with torch.no_grad():
        logits = model(x)
    expected = [expected_values(logits, y), expected_values(logits, zeros.tensors[1])]
    assert expected[0]["acc"] != expected[1]["acc"]
    metrics = t.callback_metrics
    for idx, values in enumerate(expected):
        for key, value in values.items():
            torch.testing.assert_close(metrics[f"val/{key}/dataloader_idx_{idx}"], value, rtol=1e-5, atol=1e-6)
    assert "val/acc" not in metrics

    results = t.test(model, [loader(val, 24), loader(zeros, 24)], verbose=False)
    for idx, values in enumerate(expected):
        for key, value in values.items():
            assert results[idx][f"test/{key}/dataloader_idx_{idx}"] == pytest.approx(float(value), rel=1e-5, abs=1e-6)


# -- several loss calls in one step -------------------------------------------------------------
class TwoHeads(ASSoftmaxMixin, L.LightningModule):
    """A main head and an auxiliary head; only the main head's loss call logs."""

    def __init__(self, lr: float = 0.0):
        super().__init__(delta=0.1)
        self.lr = lr
        self.main = nn.Linear(8, 4)
        self.aux = nn.Linear(8, 4)

    def _loss(self, batch):
        x, y = batch
        main = self.as_softmax_loss(self.main(x), y)
        return main + 0.5 * self.as_softmax_loss(self.aux(x), y, log=False)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self._loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_only_the_loss_call_with_log_true_is_logged_and_counted():
    torch.manual_seed(0)
    data = blobs(48, seed=2)
    model = TwoHeads()  # lr=0: the weights the references use are the ones every batch saw
    with torch.no_grad():
        model.aux.weight.mul_(20)  # a very different head: mixing it in would show
    t = trainer(max_epochs=1, num_sanity_val_steps=0)
    t.fit(model, loader(data), loader(data))
    x, y = data.tensors
    with torch.no_grad():
        main, aux = model.main(x), model.aux(x)
    want, other = expected_values(main, y), expected_values(aux, y)
    assert abs(float(want["loss"] - other["loss"])) > 0.1
    metrics = t.callback_metrics
    torch.testing.assert_close(metrics["train/loss_epoch"], want["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["train/masked_ratio_epoch"], want["masked_ratio"])
    for key, value in want.items():
        torch.testing.assert_close(metrics[f"val/{key}"], value, rtol=1e-5, atol=1e-6)
    # The counts handed to AdaptiveGradAccumulation are those of the logging call of the last batch.
    masked, valid = model.as_softmax_last_stats
    last_x, last_y = x[32:], y[32:]
    with torch.no_grad():
        rows = reference_as_softmax(model.main(last_x), last_y, 0.1, reduction="none")
    assert (int(masked), int(valid)) == (int((rows == 0).sum()), 16)


class TwoLoggedHeads(TwoHeads):
    def _loss(self, batch):
        x, y = batch
        return self.as_softmax_loss(self.main(x), y) + self.as_softmax_loss(self.aux(x), y)


def test_a_second_logging_call_in_a_step_warns_once_and_both_are_counted():
    data = blobs(48, seed=2)
    model = TwoLoggedHeads()
    t = trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"more than once in one train step.*log=False") as records:
        t.fit(model, loader(data))
    assert sum("more than once" in str(r.message) for r in records) == 1
    x, y = data.tensors[0][32:], data.tensors[1][32:]
    with torch.no_grad():
        zero = sum(int((reference_as_softmax(head(x), y, 0.1, reduction="none") == 0).sum()) for head in (model.main, model.aux))
    masked, valid = model.as_softmax_last_stats
    assert (int(masked), int(valid)) == (zero, 32)
