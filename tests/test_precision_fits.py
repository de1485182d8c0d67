"""Lightning fits of every ready-made model, each configuration under ``precision="32-true"`` and
``"bf16-mixed"``: a few batches of tiny synthetic data, then what a user checks first.

- every step's loss and the logged ``train/loss`` and ``train/masked_ratio`` are finite and in range;
- every part of the model (each child module with parameters) was updated;
- the fit's last ``val/loss`` equals a float32 evaluation of the trained weights (exactly for
  ``32-true``; within bf16's rounding for ``"bf16-mixed"``).

On CPU Lightning runs ``"16-mixed"`` as ``"bf16-mixed"``; with CUDA the same fits also run there.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from test_heads_models import HEAD_KWARGS, V, token_batches
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax.heads import HEAD_NAMES
from lightning_assoftmax.models import ImageClassifier, TextClassifier, TokenClassifier

PRECISIONS = ["32-true", "bf16-mixed"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
# delta = 0 masks a row as soon as its target is the strict argmax: the masked ratio moves from
# the first steps on, as the few steps here could not make rows confident enough for a larger delta.
DELTA = 0.0
VOCAB, CLASSES, LENGTH = 60, 5, 12
MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # the bundled offline copy


pytestmark = pytest.mark.usefixtures("one_thread")


# -- tiny data: learnable, so the losses and masked ratios move -----------------------------------
def text_batches(seed: int, n: int = 32, multilabel: bool = False) -> list[dict[str, torch.Tensor]]:
    """Token ids drawn mostly from their class's slice of the vocabulary, right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    width = (VOCAB - 1) // CLASSES
    ids = 1 + labels[:, None] * width + torch.randint(0, width, (n, LENGTH), generator=g)
    noise = torch.rand(n, LENGTH, generator=g) < 0.3
    ids = torch.where(noise, torch.randint(1, VOCAB, (n, LENGTH), generator=g), ids)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = ids * mask
    if multilabel:
        second = torch.randint(0, CLASSES, (n,), generator=g)
        target = torch.zeros(n, CLASSES)
        target[torch.arange(n), labels] = 1.0
        target[torch.arange(n), second] = 1.0
    else:
        target = labels
    return [{"input_ids": a, "attention_mask": m, "labels": t} for a, m, t in zip(ids, mask, target, strict=True)]


def image_data(seed: int, n: int = 32, multilabel: bool = False) -> TensorDataset:
    """8x8 grayscale images: a bright row per class (two for multi-label), plus noise."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, CLASSES)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    target[torch.arange(n), labels] = 1.0
    if multilabel:
        target[torch.arange(n), torch.randint(0, CLASSES, (n,), generator=g)] = 1.0
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    images[:, 0, :CLASSES, :] += 2.0 * target[:, :, None]
    return TensorDataset(images, target if multilabel else labels)


# -- the configurations: model factory and data ---------------------------------------------------
def _text(lr: float = 0.02, **kwargs):
    return TextClassifier(
        num_classes=CLASSES, vocab_size=VOCAB, embeddings=None, embed_dim=16, hidden_dim=16, lr=lr,
        delta=DELTA, **kwargs,
    )


def _image(**kwargs):
    return ImageClassifier(num_classes=CLASSES, channels=4, lr=0.02, delta=DELTA, **kwargs)


def _token(head: str | None = None, **kwargs):
    loss = "softmax" if head == "nce" else "as_softmax"  # nce has no AS-Softmax form
    return TokenClassifier(
        num_classes=V, vocab_size=V, embed_dim=8, hidden_dim=16, lr=0.02, delta=DELTA, head=head,
        head_kwargs=HEAD_KWARGS.get(head), loss=loss, **kwargs,
    )


CONFIGS = {
    "text": (lambda: _text(), lambda seed: text_batches(seed)),
    "text_multilabel": (lambda: _text(multilabel=True), lambda seed: text_batches(seed, multilabel=True)),
    "text_head_adaptive": (
        lambda: _text(head="adaptive", head_kwargs={"cutoffs": [2], "div_value": 2.0}), lambda seed: text_batches(seed)
    ),
    "text_backbone": (
        lambda: _text(backbone=MINILM, pooling="first", lr=1e-3), lambda seed: text_batches(seed)
    ),
    "image": (lambda: _image(), lambda seed: image_data(seed)),
    "image_multilabel": (lambda: _image(multilabel=True), lambda seed: image_data(seed, multilabel=True)),
    # the linear output layer trains through the fused as_softmax_linear_loss
    "token": (lambda: _token(), lambda seed: token_batches(seed)),
    **{f"token_head_{head}": ((lambda head=head: _token(head)), lambda seed: token_batches(seed)) for head in HEAD_NAMES},
}


def _fit(config: str, precision: str, device: str):
    make_model, make_data = CONFIGS[config]
    torch.manual_seed(0)
    model = make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    steps: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            metrics = trainer.callback_metrics
            steps.append(
                {
                    "loss": float(loss.detach()),
                    "logged": float(metrics["train/loss_step"]),
                    **({"masked_ratio": float(metrics["train/masked_ratio_step"])} if "train/masked_ratio_step" in metrics else {}),
                }
            )

    trainer = L.Trainer(
        accelerator=device, devices=1, precision=precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Record()],
    )
    train, val = DataLoader(make_data(0), batch_size=8), DataLoader(make_data(1), batch_size=8)
    trainer.fit(model, train, val)
    assert len(steps) == len(train)
    return model, before, steps, dict(trainer.callback_metrics), val


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_ready_made_model_fits(config, precision, device):
    model, before, steps, metrics, val = _fit(config, precision, device)

    for step in steps:
        assert math.isfinite(step["loss"]) and step["loss"] >= 0.0, steps
        assert step["logged"] == pytest.approx(step["loss"], rel=1e-6, abs=1e-7), steps
        if "masked_ratio" in step:
            assert 0.0 <= step["masked_ratio"] <= 1.0, steps
    for key in ("train/loss_epoch", "val/loss", "val/ce_loss", "val/acc"):
        assert math.isfinite(float(metrics[key])), key
    # AS-Softmax reports masked samples (some, at delta = 0); the plain softmax baseline logs none.
    if model.as_softmax_loss_name == "as_softmax":
        assert 0.0 <= float(metrics["train/masked_ratio_epoch"]) <= 1.0
        assert max(step["masked_ratio"] for step in steps) > 0.0, steps
    else:
        assert "train/masked_ratio_epoch" not in metrics

    model = model.cpu()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for child, module in model.named_children():
        names = {f"{child}.{name}" for name, _ in module.named_parameters()}
        assert not names or names & changed, f"no parameter of {child} changed"

    # The same weights evaluated in float32: the fit's last validation ran after its last step.
    evaluation = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    (full,) = evaluation.validate(model, val, verbose=False)
    if precision == "32-true":
        assert float(metrics["val/loss"]) == pytest.approx(full["val/loss"], rel=1e-5, abs=1e-6)
    else:
        assert float(metrics["val/loss"]) == pytest.approx(full["val/loss"], rel=1e-2, abs=1e-2)
        assert float(metrics["val/acc"]) == pytest.approx(full["val/acc"], abs=0.1)
