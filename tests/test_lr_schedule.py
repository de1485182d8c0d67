"""The ready-made models' learning-rate schedule (``lr_schedule``, ``warmup_fraction``), checked
against ``transformers``' schedulers and hand-computed values, also under gradient accumulation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import AdaptiveGradAccumulation, SkipMaskedSamples
from lightning_assoftmax.models import ImageClassifier, TextClassifier, TokenClassifier

transformers = pytest.importorskip("transformers")

BASE_LR = 0.01


pytestmark = pytest.mark.usefixtures("one_thread")


class LRRecorder(L.Callback):
    """The learning rate each optimizer step uses, read just before the step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.batches_at_step: list[int] = []
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.batches_at_step.append(self._batches)


def image_data(batches: int, batch_size: int = 4) -> DataLoader:
    images = torch.randn(batches * batch_size, 1, 4, 4)
    labels = torch.randint(0, 3, (batches * batch_size,))
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def fit_lrs(model: L.LightningModule, loader, callbacks=(), **trainer_kwargs) -> LRRecorder:
    recorder = LRRecorder()
    checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = L.Trainer(
        callbacks=[recorder, *callbacks], logger=False, enable_checkpointing=checkpointing,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, loader)
    return recorder


def reference_lrs(make_scheduler, steps: int) -> list[float]:
    """LRs of the ``steps`` optimizer steps under a ``transformers`` scheduler, stepped after each."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def tiny_model(kind: str, **kwargs) -> tuple[L.LightningModule, DataLoader]:
    """A small ready-made model of each kind and a loader of 5 batches for it."""
    if kind == "image":
        return ImageClassifier(num_classes=3, channels=4, lr=BASE_LR, **kwargs), image_data(5)
    ids = torch.randint(1, 20, (20, 6))
    if kind == "text":
        data = [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": i % 3} for i in range(20)]
        model = TextClassifier(num_classes=3, vocab_size=20, embeddings=None, embed_dim=8, hidden_dim=8, lr=BASE_LR, **kwargs)
    else:
        data = [{"input_ids": ids[i], "labels": ids[i] % 3} for i in range(20)]
        model = TokenClassifier(num_classes=3, vocab_size=20, embed_dim=8, hidden_dim=8, lr=BASE_LR, **kwargs)
    return model, DataLoader(data, batch_size=4)


@pytest.mark.parametrize("kind", ["image", "text", "token"])
def test_linear_schedule_with_warmup_matches_transformers(kind):
    # 5 batches x 4 epochs = 20 steps; a 10% warm-up is 2 steps.
    model, loader = tiny_model(kind, lr_schedule="linear", warmup_fraction=0.1)
    recorder = fit_lrs(model, loader, max_epochs=4)
    expected = reference_lrs(lambda opt: transformers.get_linear_schedule_with_warmup(opt, 2, 20), 20)
    assert recorder.lrs == pytest.approx(expected, abs=1e-12)
    assert recorder.lrs[:3] == pytest.approx([0.0, BASE_LR / 2, BASE_LR])
    assert recorder.lrs[-1] == pytest.approx(BASE_LR / 18)


def test_constant_schedule_with_warmup_matches_transformers():
    model, loader = tiny_model("image", lr_schedule="constant", warmup_fraction=0.25)
    recorder = fit_lrs(model, loader, max_epochs=4)
    expected = reference_lrs(lambda opt: transformers.get_constant_schedule_with_warmup(opt, 5), 20)
    assert recorder.lrs == pytest.approx(expected, abs=1e-12)


def test_linear_decay_without_warmup_and_the_default_keeps_the_rate():
    model, loader = tiny_model("image", lr_schedule="linear")
    recorder = fit_lrs(model, loader, max_epochs=2)
    assert recorder.lrs == pytest.approx([BASE_LR * (1 - i / 10) for i in range(10)])
    model, loader = tiny_model("image")
    assert fit_lrs(model, loader, max_epochs=2).lrs == [BASE_LR] * 10
    assert not isinstance(model.configure_optimizers(), dict)  # no scheduler at all by default


def test_max_steps_places_the_schedule_by_optimizer_steps():
    model, loader = tiny_model("image", lr_schedule="linear", warmup_fraction=0.25)
    recorder = fit_lrs(model, loader, max_steps=8, max_epochs=-1)
    expected = reference_lrs(lambda opt: transformers.get_linear_schedule_with_warmup(opt, 2, 8), 8)
    assert recorder.lrs == pytest.approx(expected, abs=1e-12)


def test_fixed_accumulation_follows_the_share_of_batches_run():
    # 5 batches per epoch, 2 epochs, windows of 2: steps after batches 2, 4, 5 | 7, 9, 10 of 10.
    # The LR of a step is f(share done before it), f(p) = p / 0.2 below 0.2, else (1 - p) / 0.8.
    model, loader = tiny_model("image", lr_schedule="linear", warmup_fraction=0.2)
    recorder = fit_lrs(model, loader, max_epochs=2, accumulate_grad_batches=2)
    assert recorder.batches_at_step == [2, 4, 5, 7, 9, 10]
    shares = [0.0, 0.2, 0.4, 0.5, 0.7, 0.9]
    expected = [0.0, 1.0, 0.75, 0.625, 0.375, 0.125]
    assert [s / 0.2 if s < 0.2 else (1 - s) / 0.8 for s in shares] == pytest.approx(expected)
    assert recorder.lrs == pytest.approx([BASE_LR * f for f in expected])


class AlwaysMasked(ImageClassifier):
    """Reports every sample as masked, so AdaptiveGradAccumulation grows its window to the cap
    after the first step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        count = torch.tensor(batch[1].numel())
        return {"loss": loss, "masked_count": count, "valid_count": count}


def test_adaptive_accumulation_still_decays_to_the_end_of_training():
    # 10 batches per epoch, 2 epochs. Windows: [0] [1] (k=2 pending until an even index), then
    # pairs: steps after batches 1, 2, 4, ..., 10 | 12, ..., 20 of 20: 11 steps, not the 20 that
    # estimated_stepping_batches plans. The decay is placed by batches run, so the last step
    # uses f(18/20) and training ends with the rate at 0, as in a run without the callback.
    model = AlwaysMasked(num_classes=3, channels=4, lr=BASE_LR, lr_schedule="linear", warmup_fraction=0.1)
    recorder = fit_lrs(
        model, image_data(10), callbacks=[AdaptiveGradAccumulation(max_accumulate_grad_batches=2)], max_epochs=2
    )
    assert recorder.batches_at_step == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    before = [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    factors = [b / 2 if b < 2 else (20 - b) / 18 for b in before]
    assert recorder.lrs == pytest.approx([BASE_LR * f for f in factors])
    assert factors[-1] == pytest.approx(1 / 9)
    # A schedule counted in optimizer steps over estimated_stepping_batches (20) would end at
    # transformers' LR of step 11 of 20, about half the peak.
    by_steps = reference_lrs(lambda opt: transformers.get_linear_schedule_with_warmup(opt, 2, 20), 11)
    assert by_steps[-1] == pytest.approx(BASE_LR * 10 / 18)


class LabelZeroMasked(ImageClassifier):
    """Reports the samples of class 0 as masked, so SkipMaskedSamples rests them."""

    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "masked_samples": batch[1] == 0}


def test_skipping_shortens_epochs_and_the_decay_still_ends_at_the_last_batch():
    # 40 samples, half of class 0, batches of 4: epoch 0 runs 10 batches, epoch 1 only the 20
    # unmasked samples (5 batches), epoch 2 (the full-data epoch) all 10. The share done before
    # a step counts epochs plus the batches of the current epoch over its own length.
    images = torch.randn(40, 1, 4, 4)
    labels = torch.arange(40) % 2
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    model = LabelZeroMasked(num_classes=3, channels=4, lr=BASE_LR, lr_schedule="linear")
    recorder = fit_lrs(model, loader, callbacks=[SkipMaskedSamples(max_rest=1, full_data_epochs=1)], max_epochs=3)
    shares = [b / 10 / 3 for b in range(10)] + [(1 + b / 5) / 3 for b in range(5)] + [(2 + b / 10) / 3 for b in range(10)]
    assert len(recorder.lrs) == 25  # not the 30 that estimated_stepping_batches plans
    assert recorder.lrs == pytest.approx([BASE_LR * (1 - share) for share in shares])


class StopAfterSteps(L.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


@pytest.mark.parametrize("stop_at", [7, 10])  # mid-epoch, and at an epoch's end
def test_a_resumed_fit_continues_the_schedule(tmp_path, stop_at):
    loader = image_data(5)
    model, _ = tiny_model("image", lr_schedule="linear", warmup_fraction=0.1)
    whole = fit_lrs(model, loader, max_epochs=4).lrs

    model, _ = tiny_model("image", lr_schedule="linear", warmup_fraction=0.1)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_at, save_top_k=-1)
    first = fit_lrs(model, loader, callbacks=[StopAfterSteps(stop_at), checkpoint], max_epochs=4)
    (path,) = tmp_path.glob("*.ckpt")
    model, _ = tiny_model("image", lr_schedule="linear", warmup_fraction=0.1)
    recorder = LRRecorder()
    trainer = L.Trainer(
        max_epochs=4, callbacks=[recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, loader, ckpt_path=str(path))
    assert len(first.lrs) == stop_at
    assert first.lrs + recorder.lrs == pytest.approx(whole)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr_schedule": "cosine"}, r"lr_schedule must be one of 'constant', 'linear', got 'cosine'"),
        ({"lr_schedule": "linear", "warmup_fraction": 1.0}, r"warmup_fraction must lie in \[0, 1\), got 1.0"),
        ({"warmup_fraction": -0.1}, r"warmup_fraction must lie in \[0, 1\), got -0.1"),
    ],
)
def test_bad_schedule_settings_are_refused_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(num_classes=3, **kwargs)


def test_a_schedule_needs_a_finite_training_length():
    model, loader = tiny_model("image", lr_schedule="linear")
    trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"needs a finite training length.*max_epochs"):
        trainer.fit(model, loader)


@pytest.mark.parametrize("model_class", [ImageClassifier, TextClassifier, TokenClassifier])
def test_every_model_documents_the_schedule_arguments_for_the_cli_help(model_class):
    # jsonargparse builds the CLI's --help from the docstring's Args section with docstring_parser.
    docstring_parser = pytest.importorskip("docstring_parser")
    params = {p.arg_name: p.description for p in docstring_parser.parse(model_class.__doc__).params}
    assert "{lr_schedule_args}" not in model_class.__doc__
    assert params["lr_schedule"].startswith('``"constant"`` (default) or ``"linear"``')
    assert "decay it linearly to 0 at the end of training" in params["lr_schedule"]
    assert params["warmup_fraction"] == (
        "share of training over which the learning rate rises linearly from 0\nto ``lr`` (in [0, 1); 0: no warm-up)."
    )
    # the entries after the shared ones are still parsed as arguments of their own
    assert "further :class:`ASSoftmaxMixin` options" in params["**as_softmax_options"]
