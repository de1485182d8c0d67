"""``ASSoftmaxTrainer``'s logged numbers against a plain ``transformers.Trainer`` and plain PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

from lightning_assoftmax.huggingface import ASSoftmaxTrainer  # noqa: E402


class Linear(nn.Module):
    """Logits of a linear layer; with ``with_loss`` it also returns the batch-mean cross entropy,
    as a Hugging Face model does when given labels."""

    def __init__(self, with_loss: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(6, 3)
        self.with_loss = with_loss

    def forward(self, features, labels=None):
        logits = self.linear(features)
        if self.with_loss and labels is not None:
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}
        return {"logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"features": self.features[i], "labels": self.labels[i]}


def _data(n: int = 48):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(n, 6, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    labels[::5] = -100  # ignored positions
    return Rows(features, labels)


def _args(tmp_path, **kwargs):
    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=0.1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, **kwargs,
    )


def test_eval_ce_loss_is_the_plain_cross_entropy_of_the_logits(tmp_path):
    data = _data()
    trainer = ASSoftmaxTrainer(model=Linear(), args=_args(tmp_path), eval_dataset=data, delta=0.1)
    metrics = trainer.evaluate()
    with torch.no_grad():
        logits = trainer.model.linear(data.features)
    expected = F.cross_entropy(logits.double(), data.labels, ignore_index=-100)
    assert metrics["eval_ce_loss"] == pytest.approx(float(expected), rel=1e-5)
    # the AS-Softmax loss of the same logits is lower or equal (it drops classes)
    assert metrics["eval_loss"] <= metrics["eval_ce_loss"] + 1e-6


def test_logged_training_loss_under_accumulation_matches_a_plain_trainer(tmp_path):
    # delta=1 is cross entropy; with no ignored labels every micro-batch has as many labels, so
    # the per-label mean over a step equals the mean of the micro-batch means a plain Trainer logs.
    data = _data()
    data.labels[data.labels == -100] = 0
    args = {"max_steps": 3, "gradient_accumulation_steps": 2}
    ours = ASSoftmaxTrainer(model=Linear(), args=_args(tmp_path / "a", **args), train_dataset=data, delta=1.0)
    plain = Trainer(model=Linear(with_loss=True), args=_args(tmp_path / "b", **args), train_dataset=data)
    ours.train()
    plain.train()
    logged = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (ours, plain)]
    assert len(logged[0]) == 3 and logged[0] == pytest.approx(logged[1], rel=1e-5)
