"""``transformers.Trainer`` integration: the loss against plain-PyTorch references, the masked ratio
in the Trainer's logs, and the example on the bundled MiniLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import reference_as_softmax
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402

from lightning_assoftmax.huggingface import ASSoftmaxLossFunc, ASSoftmaxTrainer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_loss_func_on_sequence_and_token_logits():
    gen = torch.Generator().manual_seed(0)
    loss_func = ASSoftmaxLossFunc(delta=0.2)
    logits = torch.randn(6, 5, generator=gen) * 3
    labels = torch.tensor([0, 4, -100, 2, 2, 1])
    expected = reference_as_softmax(logits, labels, 0.2)
    torch.testing.assert_close(loss_func({"logits": logits}, labels), expected)
    # A Trainer step over several micro-batches: the sum divided by the step's label count.
    rows = reference_as_softmax(logits, labels, 0.2, reduction="none")
    torch.testing.assert_close(loss_func((logits,), labels, num_items_in_batch=torch.tensor(12)), rows.sum() / 12)

    tokens = torch.randn(2, 7, 5, generator=gen) * 3  # (N, L, C) as token classifiers return them
    token_labels = torch.randint(0, 5, (2, 7), generator=gen)
    token_labels[1, 4:] = -100
    expected = reference_as_softmax(tokens.reshape(14, 5), token_labels.reshape(14), 0.2)
    torch.testing.assert_close(loss_func({"logits": tokens}, token_labels), expected)

    masked, valid = loss_func.pop_counts()
    zero = sum(
        int(((reference_as_softmax(z, t, 0.2, reduction="none") == 0) & (t != -100)).sum())
        for z, t in ((logits, labels), (logits, labels), (tokens.reshape(14, 5), token_labels.reshape(14)))
    )
    assert (int(masked), int(valid)) == (zero, 5 + 5 + 11)
    assert loss_func.pop_counts() is None

    with pytest.raises(ValueError, match=r"logits \(N, C\) with labels \(N\).*got logits \(6, 5\) and labels \(6, 5\)"):
        loss_func({"logits": logits}, torch.zeros(6, 5, dtype=torch.long))


class TinyModel(nn.Module):
    """What the Trainer needs of a model: keyword inputs, a ``logits`` output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 4)

    def forward(self, x, labels=None):
        return {"logits": self.linear(x) * 4}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_trainer_step_is_the_mean_over_the_accumulated_labels_and_logs_the_masked_ratio(tmp_path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 8, generator=gen)
    y = torch.randint(0, 4, (8,), generator=gen)
    y[[1, 2, 6]] = -100  # 5 labels count; micro-batches of 4 hold different numbers of them
    model = TinyModel()
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = ASSoftmaxTrainer(model=model, args=args, train_dataset=Rows(x, y), eval_dataset=Rows(x, y), delta=0.1)
    trainer.train()

    # One optimizer step over all 8 rows: the gradient of the mean loss over the 5 labelled rows.
    params = [p.clone().requires_grad_(True) for p in before]
    logits = F.linear(x, params[0], params[1]) * 4
    loss = reference_as_softmax(logits, y, 0.1)
    grads = torch.autograd.grad(loss, params)
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-5, atol=1e-6)

    rows = reference_as_softmax(logits.detach(), y, 0.1, reduction="none")
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    assert entry["masked_ratio"] == pytest.approx(float(((rows == 0) & (y != -100)).sum()) / 5)
    assert entry["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)

    metrics = trainer.evaluate()
    with torch.no_grad():
        logits = model(x)["logits"]
    rows = reference_as_softmax(logits, y, 0.1, reduction="none")
    assert metrics["eval_masked_ratio"] == pytest.approx(float(((rows == 0) & (y != -100)).sum()) / 5)
    assert trainer.state.log_history[-1]["eval_masked_ratio"] == metrics["eval_masked_ratio"]

    with pytest.raises(ValueError, match="sets compute_loss_func itself"):
        ASSoftmaxTrainer(model=model, args=args, compute_loss_func=lambda *a, **k: 0)


def test_trainer_with_its_own_ignore_index_takes_the_mean_over_its_labels(tmp_path):
    # transformers counts num_items_in_batch as labels != -100. With ignore_index=-1 the padding
    # must leave the divisor too, in training (over the accumulated micro-batches) and evaluation.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 8, generator=gen)
    y = torch.randint(0, 4, (8,), generator=gen)
    y[[0, 1, 2, 6]] = -1  # the micro-batches hold 1 and 3 of the 4 labels that count
    model = TinyModel()
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        per_device_eval_batch_size=4, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,
    )
    trainer = ASSoftmaxTrainer(
        model=model, args=args, train_dataset=Rows(x, y), eval_dataset=Rows(x, y), delta=0.3, ignore_index=-1
    )
    trainer.train()

    # Plain float64 reference: cross entropy over the kept classes, mean over the 4 labelled rows.
    params = [p.to(torch.float64).requires_grad_(True) for p in before]
    logits = F.linear(x.double(), params[0], params[1]) * 4
    valid = y != -1
    rows = reference_as_softmax(logits[valid], y[valid], 0.3, reduction="none")
    loss = rows.sum() / 4
    grads = torch.autograd.grad(loss, params)
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), (p0 - 0.1 * g).float(), rtol=1e-5, atol=1e-6)
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    assert entry["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)

    # Evaluation: the mean of the per-batch means (batches of 4: 1 and 3 labels), as the Trainer averages them.
    with torch.no_grad():
        logits = model(x)["logits"].double()
    first, second = (
        reference_as_softmax(logits[i : i + 4][valid[i : i + 4]], y[i : i + 4][valid[i : i + 4]], 0.3)
        for i in (0, 4)
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(float((first + second) / 2), rel=1e-5)


def test_loss_func_refuses_an_ignore_index_the_trainer_does_not_count(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"ignore_index=-1\).*not -100.*ASSoftmaxTrainer\(\.\.\., ignore_index=-1\)"):
        ASSoftmaxLossFunc(delta=0.1, ignore_index=-1)
    # A transformers release that counts the labels where ASSoftmaxTrainer cannot change the rule.
    import transformers

    monkeypatch.delattr(transformers.Trainer, "_get_num_items_in_batch")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"ignore_index=-1\) needs a newer transformers release"):
        ASSoftmaxTrainer(model=TinyModel(), args=args, ignore_index=-1)


@pytest.mark.slow
def test_example_fine_tunes_minilm_with_the_masked_ratio_in_the_logs(tmp_path):
    spec = importlib.util.spec_from_file_location("huggingface_trainer", EXAMPLES / "huggingface_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # delta=0 masks a sample exactly when its label is the strict argmax, so the ratio moves from
    # the first steps on; a few short articles keep the run to seconds.
    trainer = example.main(
        ["--docs-per-class", "4", "--eval-docs-per-class", "2", "--max-steps", "3", "--batch-size", "4",
         "--max-length", "32", "--lr", "1e-3", "--delta", "0", "--output-dir", str(tmp_path)]
    )
    history = trainer.state.log_history
    training = [entry for entry in history if "loss" in entry]
    assert len(training) == 3
    assert all(0.0 <= entry["masked_ratio"] <= 1.0 for entry in training)

    # The logged evaluation values against the trained model's logits on the evaluation articles.
    data = trainer.eval_dataset
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.encoded["input_ids"], attention_mask=data.encoded["attention_mask"]).logits
    rows = reference_as_softmax(logits, data.labels, 0.0, reduction="none")
    evaluation = history[-1]
    assert evaluation["eval_masked_ratio"] == pytest.approx(float((rows == 0).float().mean()))
    assert evaluation["eval_loss"] == pytest.approx(float(rows.mean()), rel=1e-4)
    assert 0.0 < evaluation["eval_masked_ratio"] < 1.0
