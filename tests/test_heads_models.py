"""The ready-made models with ``head=``: what the mixin logs (recomputed here from the head's exact
distribution), the loss options each head takes, checkpoints, and the CLI with class counts
taken from the datamodule."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from reference import reference_as_softmax
from torch.utils.data import DataLoader

from lightning_assoftmax.heads import AdaptiveSoftmaxHead, HierarchicalSoftmaxHead
from lightning_assoftmax.models import TextClassifier, TokenClassifier

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
V = 40
DELTA = 0.3
HEAD_KWARGS = {
    "adaptive": {"cutoffs": [5, 15], "div_value": 2.0},
    "sampled": {"num_samples": 12},
    "nce": {"num_samples": 12},
}


def token_batches(seed: int, n: int = 24, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Zipf-like token windows (a few frequent ids, a long tail); the last positions ignored."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, n * (length + 1), replacement=True, generator=g).reshape(n, length + 1)
    labels = ids[:, 1:].clone()
    labels[:, -2:] = -100
    return [{"input_ids": a, "labels": b} for a, b in zip(ids[:, :-1], labels, strict=True)]


def class_counts() -> list[int]:
    labels = torch.stack([item["labels"] for item in token_batches(0)])
    return torch.bincount(labels[labels >= 0], minlength=V).tolist()


def fit(model: L.LightningModule, epochs: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(token_batches(0), batch_size=8), DataLoader(token_batches(1), batch_size=8))
    return trainer


def token_model(head: str | None, loss: str = "as_softmax", **kwargs) -> TokenClassifier:
    return TokenClassifier(
        num_classes=V, vocab_size=V, embed_dim=8, hidden_dim=16, dropout=0.0, lr=0.02, delta=DELTA,
        head=head, head_kwargs=HEAD_KWARGS.get(head), class_counts=class_counts(), loss=loss, **kwargs,
    )


@pytest.mark.parametrize(
    "head, loss",
    [
        ("adaptive", "as_softmax"), ("class_based", "as_softmax"), ("hierarchical", "as_softmax"),
        ("sampled", "as_softmax"), ("dense", "as_softmax"), ("hierarchical", "softmax"), ("nce", "softmax"),
        ("dense", "t_softmax"),
    ],
)
def test_validation_metrics_come_from_the_heads_exact_distribution(head, loss, one_thread):
    plain = fit(token_model(None, loss=loss))
    model = token_model(head, loss=loss)
    trainer = fit(model)
    assert set(trainer.callback_metrics) == set(plain.callback_metrics)

    model.eval()
    batch = {k: torch.stack([item[k] for item in token_batches(1)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        log_p = model(batch["input_ids"]).reshape(-1, V)
    target = batch["labels"].reshape(-1)
    valid = target != -100
    metrics = trainer.callback_metrics
    ce = F.nll_loss(log_p[valid], target[valid])
    torch.testing.assert_close(metrics["val/ce_loss"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["val/acc"], (log_p.argmax(1) == target)[valid].float().mean())
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones_like(target, dtype=torch.float32))
    if loss == "as_softmax":
        want = reference_as_softmax(log_p, target, DELTA)
        torch.testing.assert_close(metrics["val/loss"], want, rtol=1e-5, atol=1e-6)
        rows = reference_as_softmax(log_p, target, DELTA, reduction="none")
        masked = ((rows == 0) & valid).float().sum() / valid.sum()
        torch.testing.assert_close(metrics["val/masked_ratio"], masked)
    elif head != "dense":
        torch.testing.assert_close(metrics["val/loss"], ce, rtol=1e-5, atol=1e-6)
    predicted = model.predict_step(batch, 0)
    assert torch.equal(predicted.reshape(-1), log_p.argmax(1))


@pytest.mark.parametrize("skip_masked", [False, True])
def test_weighted_dense_head_takes_the_mean_over_the_targets_weights(skip_masked, one_thread):
    """Each step's loss and the epoch's val/loss are F.cross_entropy(weight=) means, also when
    SkipMaskedSamples makes the mixin reduce the head's per-row losses itself."""
    from lightning_assoftmax import SkipMaskedSamples

    weight = torch.linspace(0.2, 5.0, V, dtype=torch.float64)[torch.randperm(V, generator=torch.Generator().manual_seed(4))]
    model = token_model("dense", loss="weighted_softmax", loss_kwargs={"weight": weight.tolist()})
    w32 = weight.float()

    def reference(batch):
        with torch.no_grad():
            logits = model.output.linear(model.features(batch["input_ids"]))
        return F.cross_entropy(logits.transpose(1, 2), batch["labels"], weight=w32)

    class Check(L.Callback):
        steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.want = reference(batch)  # the weights the step's loss was computed with

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.testing.assert_close(outputs["loss"].detach(), self.want, rtol=1e-5, atol=1e-6)
            Check.steps += 1

    callbacks = [Check()] + ([SkipMaskedSamples()] if skip_masked else [])
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    val = token_batches(1)
    trainer.fit(model, DataLoader(token_batches(0), batch_size=8), DataLoader(val, batch_size=8))
    assert Check.steps == 3
    batch = {k: torch.stack([item[k] for item in val]) for k in ("input_ids", "labels")}
    model.eval()
    # The epoch value over the 3 batches: the weighted mean over all their targets, not a mean of batch means.
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], reference(batch), rtol=1e-5, atol=1e-6)


def test_weighted_dense_head_takes_balanced_weights_from_the_training_labels(one_thread):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (16, 11), generator=g)
    ids[:4].view(-1)[:V] = torch.arange(V)  # every class among the labels
    items = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    model = token_model("dense", loss="weighted_softmax")
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(items, batch_size=8), DataLoader(items[:8], batch_size=8))
    labels = ids[:, 1:].reshape(-1)
    n_c = torch.bincount(labels, minlength=V).double()
    torch.testing.assert_close(model.output.criterion.class_weight, labels.numel() / (V * n_c))


@pytest.mark.parametrize("head", ["adaptive", "hierarchical"])
def test_training_with_a_head_learns_a_deterministic_sequence(head, one_thread):
    """Next id = (3 * id + 1) mod V: learnt with AS-Softmax on the head."""
    g = torch.Generator().manual_seed(0)
    ids = torch.empty(64, 11, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (64,), generator=g)
    for i in range(1, 11):
        ids[:, i] = (3 * ids[:, i - 1] + 1) % V
    items = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    model = token_model(head)
    trainer = L.Trainer(max_epochs=12, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(items[:48], batch_size=8, shuffle=True), DataLoader(items[48:], batch_size=8))
    metrics = trainer.callback_metrics
    assert float(metrics["val/acc"]) > 0.8
    assert float(metrics["val/ce_loss"]) < 0.25 * math.log(V)
    assert float(metrics["val/masked_ratio"]) > 0.3  # confident rows reach an exact zero loss


def test_class_counts_are_kept_only_for_heads_that_use_them(tmp_path):
    counts = class_counts()
    assert token_model(None).hparams["class_counts"] is None
    assert token_model("dense").hparams["class_counts"] is None
    model = token_model("hierarchical")
    assert model.hparams["class_counts"] == counts
    assert isinstance(model.output, HierarchicalSoftmaxHead)
    trainer = fit(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = TokenClassifier.load_from_checkpoint(tmp_path / "model.ckpt")
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(restored.output.log_prob(hidden), model.output.log_prob(hidden))
    assert torch.equal(restored.output.path_nodes, model.output.path_nodes)


def test_head_kwargs_reach_the_head():
    model = token_model("adaptive")
    assert isinstance(model.output, AdaptiveSoftmaxHead)
    assert model.output.cutoffs == [5, 15, V] and model.output.permuted  # ranked by the counts
    head = TokenClassifier(num_classes=V, vocab_size=V, head="adaptive", head_kwargs={"cutoffs": [4]}).output
    assert head.cutoffs == [4, V] and not head.permuted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"head": "nce"}, "has no AS-Softmax form.*loss='softmax'"),
        ({"head": "class_based", "loss": "sparsemax"}, "own objective.*loss='as_softmax'.*head='dense'"),
        ({"head": "adaptive", "head_kwargs": {"loss": "softmax"}}, "set the loss with the model's loss="),
        ({"head": "adaptive", "head_kwargs": {"cutoffs": [50]}}, r"\[1, 39\]"),
        ({"head": "softmax"}, "Unknown head 'softmax'"),
    ],
)
def test_bad_head_options_are_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenClassifier(num_classes=V, vocab_size=V, **kwargs)


def test_text_classifier_takes_a_head():
    with pytest.raises(ValueError, match="single-label output layer"):
        TextClassifier(num_classes=5, vocab_size=30, embeddings=None, multilabel=True, head="adaptive")
    model = TextClassifier(
        num_classes=V, vocab_size=V, embeddings=None, hidden_dim=16, head="class_based",
        head_kwargs={"num_clusters": 4}, lr=0.02,
    )
    items = [{"input_ids": item["input_ids"], "labels": item["labels"][0]} for item in token_batches(0)]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(items, batch_size=8), DataLoader(items, batch_size=8))
    assert {"val/ce_loss", "val/acc", "val/loss", "val/masked_ratio"} <= set(trainer.callback_metrics)
    batch = {"input_ids": torch.stack([i["input_ids"] for i in items[:4]])}
    predicted = model.predict_step(batch, 0)
    assert predicted.shape == (4,) and torch.equal(predicted, model(batch["input_ids"]).argmax(1))


# -- the CLI --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("cli_isolated")
def test_cli_head_option_takes_class_counts_from_the_training_split():
    from lightning_assoftmax.cli import ASSoftmaxCLI

    cli = ASSoftmaxCLI(
        args=[
            "fit", "--config", str(EXAMPLES / "bbc_tokens.yaml"), "--model.head", "adaptive",
            "--data.seq_len=16", "--data.batch_size=4", "--model.embed_dim=16", "--model.hidden_dim=16",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=3",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        ]
    )
    head, data = cli.model.output, cli.datamodule
    assert isinstance(head, AdaptiveSoftmaxHead) and head.num_classes == 30522
    train_targets = torch.cat(data.datasets["train"].targets)
    counts = torch.bincount(train_targets, minlength=30522)
    assert cli.model.hparams["class_counts"] == counts.tolist()
    # The shortlist is the most frequent training targets.
    shortlist = head.class_of_slot[: head.shortlist_size]
    assert counts[shortlist].min() >= counts[head.class_of_slot[head.shortlist_size :]].max()
    metrics = cli.trainer.callback_metrics
    assert 9.0 < float(metrics["val/ce_loss"]) < 11.0  # about log(30522) = 10.3 after three steps
    assert {"val/loss", "val/acc", "val/masked_ratio"} <= set(metrics)
