"""The everyday loop through ``lightning-assoftmax`` on a user's own CSV: fit, fit again with another
loss, test and predict from a checkpoint alone; defaults of a chosen class; help; run folders."""

from __future__ import annotations

import csv
import inspect
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_assoftmax
from lightning_assoftmax import AdaptiveGradAccumulation, PredictionWriter, SkipMaskedSamples
from lightning_assoftmax import data as bundled_data
from lightning_assoftmax import models as bundled_models
from lightning_assoftmax.cli import DEFAULT_MAX_EPOCHS, ASSoftmaxCLI
from lightning_assoftmax.family import LOSS_NAMES

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# A tiny bag model: random 16-wide embeddings instead of the 384-wide MiniLM table.
TINY_MODEL = ["--model.embeddings=null", "--model.embed_dim=16", "--model.hidden_dim=16", "--model.lr=0.05"]
TOPICS = {
    "sport": "the team won the match after a late goal",
    "money": "shares and markets fell as the bank cut rates",
    "art": "a film and a song won prizes at the festival",
}


pytestmark = pytest.mark.usefixtures("cli_isolated")


def _write_csv(path: Path, rows: int, labels: bool = True) -> list[str]:
    names = list(TOPICS)
    lines = ["text,label" if labels else "text"]
    texts = []
    for i in range(rows):
        name = names[i % len(names)]
        texts.append(f"{TOPICS[name]} {i}")
        lines.append(f'"{texts[-1]}",{name}' if labels else f'"{texts[-1]}"')
    path.write_text("\n".join(lines) + "\n")
    return texts


def _summary(out: str) -> tuple[str, dict[str, str]]:
    """The title and rows of the last summary table printed after fit."""
    block = out.rsplit("Run summary: ", 1)[1].splitlines()
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in block[2:] if "  " in line]
    return block[0], {name: value for name, value in rows}


def _legend_texts(callback) -> list[str]:
    from matplotlib.figure import Figure

    figure = callback._draw(Figure)
    return [text.get_text() for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts()]


# -- the loop, end to end -------------------------------------------------------------------
@pytest.mark.slow
def test_the_loop_on_your_own_csv(tmp_path, capsys):
    _write_csv(tmp_path / "train.csv", 36)
    _write_csv(tmp_path / "test.csv", 9)
    new_texts = _write_csv(tmp_path / "new.csv", 6, labels=False)
    common = ["--data=TextFile", "--data.train_file=train.csv", "--data.batch_size=8", *TINY_MODEL, *QUIET]

    # fit with no stopping point given: it ends on its own, after the stated number of epochs
    first = ASSoftmaxCLI(args=["fit", *common, "--trainer.callbacks+=LossAccuracyCorrelation"])
    assert first.trainer.current_epoch == DEFAULT_MAX_EPOCHS and first.trainer.max_epochs == DEFAULT_MAX_EPOCHS
    title, rows = _summary(capsys.readouterr().out)
    assert "loss as_softmax(delta=0.1)" in title and "TextClassifier on TextFile" in title
    run = Path(rows["run folder"])
    assert run == tmp_path / "lightning_logs" / "as_softmax-delta0.1" / "version_0"
    assert Path(rows["config"]) == run / "config.yaml" and Path(rows["metrics CSV"]) == run / "metrics.csv"
    assert Path(rows["figure"]).is_file()
    correlation = next(cb for cb in first.trainer.callbacks if type(cb).__name__ == "LossAccuracyCorrelation")
    assert "as_softmax(delta=0.1) loss" in " ".join(_legend_texts(correlation))
    assert correlation.compare().startswith("validation as_softmax(delta=0.1) loss vs accuracy")
    # the summary's step count is the one the checkpoint holds and is named for
    checkpoint = Path(rows["checkpoint"].split(" (")[0])
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert rows["optimizer steps"] == str(first.trainer.global_step) == str(stored["global_step"])
    assert f"step={stored['global_step']}" in checkpoint.name
    assert stored["hyper_parameters"]["class_names"] == ["art", "money", "sport"]
    # metrics.csv: every row has its epoch (the correlation rows too)
    with (run / "metrics.csv").open() as handle:
        logged = list(csv.DictReader(handle))
    assert logged and all(row["epoch"] != "" for row in logged)
    assert any(row.get("val/loss_acc_pearson") for row in logged)

    # a second fit with another loss in the same place: its own folder, its own title
    second = ASSoftmaxCLI(args=["fit", *common, "--model.loss=label_smoothing", "--trainer.max_epochs=2",
                                "--trainer.callbacks+=LossAccuracyCorrelation"])
    title, rows = _summary(capsys.readouterr().out)
    assert "loss label_smoothing" in title and second.trainer.current_epoch == 2
    assert Path(rows["run folder"]) == tmp_path / "lightning_logs" / "label_smoothing" / "version_0"
    correlation = next(cb for cb in second.trainer.callbacks if type(cb).__name__ == "LossAccuracyCorrelation")
    assert "label_smoothing loss" in " ".join(_legend_texts(correlation))

    # test and predict from the checkpoint alone: the training CSV is gone
    (tmp_path / "train.csv").unlink()
    # no --data: the fit's TextFile and its arguments, the checkpoint's label names for the gone file
    tested = ASSoftmaxCLI(args=["test", f"--ckpt_path={checkpoint}", "--data.test_file=test.csv", *QUIET])
    model = tested.model
    assert type(model).__name__ == "TextClassifier" and model.class_names == ["art", "money", "sport"]
    assert type(tested.datamodule).__name__ == "TextFile" and tested.datamodule.batch_size == 8
    assert tested.datamodule.class_names == ["art", "money", "sport"]
    assert tested.trainer.callback_metrics["test/acc"].numel() == 1
    assert (run / "test" / "metrics.csv").is_file() and (run / "test" / "config.yaml").is_file()
    predicted = ASSoftmaxCLI(args=["predict", f"--ckpt_path={checkpoint}", "--data=TextFile", "--data.predict_file=new.csv", *QUIET])
    with (run / "predict" / "predictions.csv").open() as handle:
        predictions = list(csv.DictReader(handle))
    assert [row["text"] for row in predictions] == new_texts
    # the written label and probability are the model's own softmax, recomputed here
    batch = predicted.datamodule.text_tokenizer.tokenizer(new_texts, padding=True, return_tensors="pt")
    predicted.model.eval()
    with torch.no_grad():
        probabilities = predicted.model(batch["input_ids"], batch["attention_mask"]).double().softmax(-1)
    for row, p in zip(predictions, probabilities, strict=True):
        assert row["label"] == ["art", "money", "sport"][int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=1e-5)
    # nothing else was added beside the two runs
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["as_softmax-delta0.1", "label_smoothing"]
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "as_softmax-delta0.1").iterdir()) == ["version_0"]


def test_the_same_command_twice_without_a_logger(tmp_path, capsys):
    digits = ["fit", "--model=ImageClassifier", "--data=Digits", "--model.channels=4", "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.logger=false", *QUIET]
    for run in range(2):
        cli = ASSoftmaxCLI(args=digits + [f"--model.lr={0.01 * (run + 1)}"])
        assert cli.trainer.global_step == 2
    # the config of the latest run, where the summary says it went
    _, rows = _summary(capsys.readouterr().out)
    assert Path(rows["config"]) == tmp_path / "config.yaml"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.02


# -- a chosen class comes with its own defaults ---------------------------------------------
def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        ASSoftmaxCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _own_defaults(cls: type) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _as_config_value(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(bundled_data.__all__))
def test_a_chosen_datamodule_starts_from_its_own_defaults(name, tmp_path, capsys):
    _write_csv(tmp_path / "train.csv", 6)
    extra = ["--data.train_file=train.csv"] if name == "TextFile" else []
    config = _print_config([f"--data={name}", *extra], capsys)["data"]
    assert config["class_path"].endswith(f".{name}")
    defaults = _own_defaults(getattr(bundled_data, name))
    for key, value in config["init_args"].items():
        if key in defaults and not (name == "TextFile" and key == "train_file"):
            assert value == _as_config_value(defaults[key]), (name, key)


@pytest.mark.parametrize("name", sorted(bundled_models.__all__))
@pytest.mark.parametrize("data", ["BBCNews", "Digits"])
def test_a_chosen_model_starts_from_its_own_defaults(name, data, capsys):
    config = _print_config([f"--model={name}", f"--data={data}"], capsys)["model"]
    defaults = _own_defaults(getattr(bundled_models, name))
    compared = [key for key in config["init_args"] if key in defaults]
    assert {"delta", "lr", "weight_decay", "dropout"} & set(compared)
    for key in compared:
        assert config["init_args"][key] == _as_config_value(defaults[key]), (name, key)


def test_a_value_given_still_reaches_the_default_class(capsys):
    config = _print_config(["--data.max_length=32"], capsys)
    assert config["data"]["class_path"].endswith(".BBCNews")
    assert config["data"]["init_args"]["max_length"] == 32
    assert config["data"]["init_args"]["val_fraction"] == _own_defaults(bundled_data.BBCNews)["val_fraction"]


# -- help ------------------------------------------------------------------------------------
def test_help_names_the_package_lists_the_losses_and_gives_the_version(capsys):
    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            ASSoftmaxCLI(args=list(args))
        assert exit_info.value.code in (0, None)
        return " ".join(capsys.readouterr().out.split())

    assert "Adaptive Sparse Softmax" in run("--help")
    assert run("--version") == f"lightning-assoftmax {lightning_assoftmax.__version__}"
    loss_help = run("fit", "--model.help", "TextClassifier").rsplit("--model.loss LOSS ", 1)[1][:400]
    assert all(name in loss_help for name in LOSS_NAMES), loss_help
    assert ":data:" not in loss_help


# -- the prediction writer -----------------------------------------------------------------
class _Linear(L.LightningModule):
    """Logits of a fixed linear map; ``class_probabilities`` as the ready-made models define it."""

    def __init__(self, weight: torch.Tensor, class_names=None, multilabel=False):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.linear.weight.data.copy_(weight)
        self.class_names = class_names
        self.as_softmax_multilabel = multilabel

    def predict_step(self, batch, batch_idx):
        return self.linear(batch[0]).argmax(-1)

    def class_probabilities(self, batch):
        logits = self.linear(batch[0])
        return logits.sigmoid() if self.as_softmax_multilabel else logits.softmax(-1)


def _predict(tmp_path, writer, model, x):
    trainer = L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.predict(model, DataLoader(TensorDataset(x), batch_size=4), return_predictions=False)
    return Path(writer.path)


@pytest.mark.parametrize("output", ["predictions.csv", "out/predictions.jsonl"])
def test_prediction_writer_rows_against_a_plain_softmax(tmp_path, output):
    torch.manual_seed(0)
    weight, x = torch.randn(4, 3), torch.randn(10, 3)
    names = ["north", "east", "south", "west"]
    path = _predict(tmp_path, PredictionWriter(output, top_k=3), _Linear(weight, names), x)
    assert path == tmp_path / output
    reference = (x.double() @ weight.double().T).softmax(-1)
    if output.endswith(".csv"):
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        split = {"top_labels": lambda v: v.split("|"), "top_probabilities": lambda v: [float(p) for p in v.split("|")]}
        rows = [{**row, **{k: f(row[k]) for k, f in split.items()}} for row in rows]
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [int(row["id"]) for row in rows] == list(range(10))
    for row, p in zip(rows, reference, strict=True):
        order = p.argsort(descending=True)
        assert row["label"] == names[int(order[0])]
        assert float(row["probability"]) == pytest.approx(float(p[order[0]]), abs=1e-6)
        assert row["top_labels"] == [names[int(i)] for i in order[:3]]
        assert row["top_probabilities"] == pytest.approx([float(p[i]) for i in order[:3]], abs=1e-6)


def test_prediction_writer_multilabel_and_without_names(tmp_path):
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[2.0, 3.0], [-2.0, -1.0]])
    path = _predict(tmp_path, PredictionWriter("p.jsonl"), _Linear(weight, None, multilabel=True), x)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # sigmoid > 0.5 exactly where the score is positive: row 0 classes 0 and 1, row 1 class 2
    assert [row["label"] for row in rows] == [["0", "1"], ["2"]]
    assert rows[0]["probability"] == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-3))], abs=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"output": "predictions.txt"}, "must end in .csv or .jsonl"),
    ({"top_k": 0}, "top_k must be an integer >= 1"),
])
def test_prediction_writer_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        PredictionWriter(**kwargs)


# -- callbacks that would do nothing say so --------------------------------------------------
@pytest.mark.parametrize("callback", [AdaptiveGradAccumulation, SkipMaskedSamples])
@pytest.mark.parametrize("loss", ["softmax", "as_softmax"])
def test_a_callback_that_would_do_nothing_says_so_at_fit_start(tmp_path, callback, loss):
    model = bundled_models.ImageClassifier(num_classes=10, channels=4, loss=loss)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[callback()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning) if loss == "softmax" else _no_warning_about("will do nothing") as record:
        trainer.fit(model, bundled_data.Digits(batch_size=32))
    if loss == "softmax":
        (message,) = [str(w.message) for w in record if "will do nothing" in str(w.message)]
        assert message.startswith(f"{callback.__name__} will do nothing in this fit: the loss softmax never masks")


class _no_warning_about:
    def __init__(self, text: str) -> None:
        self.text = text

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self.records

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.records if self.text in str(w.message)]
        return False


# -- checkpoints name their classes ---------------------------------------------------------
def test_class_names_travel_in_the_checkpoint(tmp_path):
    data = bundled_data.Digits(batch_size=64)
    model = bundled_models.ImageClassifier(num_classes=10, channels=4, class_names=list(data.class_names))
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, callbacks=[checkpoint], logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    loaded = bundled_models.ImageClassifier.load_from_checkpoint(checkpoint.best_model_path)
    assert loaded.class_names == [str(d) for d in range(10)] == loaded.hparams["class_names"]
    with pytest.raises(ValueError, match="class_names has 3 names for num_classes=10"):
        bundled_models.ImageClassifier(num_classes=10, class_names=["a", "b", "c"])


def test_text_file_takes_class_names_instead_of_a_training_file(tmp_path):
    _write_csv(tmp_path / "test.csv", 6)
    data = bundled_data.TextFile(test_file=str(tmp_path / "test.csv"), class_names=["sport", "money", "art"])
    assert data.class_names == ["sport", "money", "art"] and data.num_classes == 3
    data.setup("test")
    # labels index into the given order, not the sorted one
    assert data.datasets["test"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="label 'art' does not occur in class_names"):
        bundled_data.TextFile(test_file=str(tmp_path / "test.csv"), class_names=["sport", "money"])
    with pytest.raises(ValueError, match="needs train_file"):
        bundled_data.TextFile(test_file=str(tmp_path / "test.csv"))


# -- a checkpoint remembers its data --------------------------------------------------------
DIGITS_FIT = ["--model=ImageClassifier", "--model.channels=4", "--data=Digits", "--data.batch_size=96",
              "--data.val_fraction=0.2", "--data.test_fraction=0.25", "--data.seed=3", "--trainer.max_steps=3", "--trainer.limit_val_batches=1", *QUIET]


def _fit_digits() -> Path:
    fitted = ASSoftmaxCLI(args=["fit", *DIGITS_FIT])
    return Path(fitted.trainer.checkpoint_callback.best_model_path)


def _accuracy_on(model, data) -> float:
    """Test accuracy recomputed here, batch by batch, from the data's own test split."""
    data.setup("test")
    model.eval()
    right = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            right += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    return right / total


def test_test_of_a_checkpoint_alone_uses_the_data_of_its_fit(tmp_path, caplog):
    # the CSV logger beside TensorBoard in the run's folder does not say it will delete files there
    with _no_warning_about("exists and is not empty"):
        checkpoint = _fit_digits()
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["lightning_assoftmax_data"]
    assert "optimizer_states" in torch.load(checkpoint, map_location="cpu", weights_only=True)  # a full checkpoint
    assert stored == {"class_path": "lightning_assoftmax.data.Digits",
                      "init_args": {"batch_size": 96, "val_fraction": 0.2, "test_fraction": 0.25, "seed": 3}}
    with _no_warning_about("dirpath has changed"), _no_warning_about("exists and is not empty"):
        tested = ASSoftmaxCLI(args=["test", f"--ckpt_path={checkpoint}", *QUIET])
    assert "test: the data of the checkpoint's fit, Digits(batch_size=96, val_fraction=0.2" in caplog.text
    data = tested.datamodule
    assert type(data) is bundled_data.Digits and (data.batch_size, data.val_fraction) == (96, 0.2)
    # the logged accuracy is the one on the fit's own test split, not on the defaults' split
    fits_split = bundled_data.Digits(batch_size=50, val_fraction=0.2, test_fraction=0.25, seed=3)
    reference = _accuracy_on(tested.model, fits_split)
    assert tested.trainer.callback_metrics["test/acc"].item() == pytest.approx(reference, abs=1e-6)
    default_split = bundled_data.Digits()
    default_split.setup("test")
    assert len(data.datasets["test"]) == len(fits_split.datasets["test"]) != len(default_split.datasets["test"])


def test_data_options_given_with_the_checkpoint_go_on_top_of_its_data(tmp_path, caplog):
    checkpoint = _fit_digits()
    caplog.clear()
    # an option alone: the fit's class and other arguments, with this one changed
    tested = ASSoftmaxCLI(args=["validate", f"--ckpt_path={checkpoint}", "--data.batch_size=32", *QUIET])
    assert type(tested.datamodule) is bundled_data.Digits
    assert (tested.datamodule.batch_size, tested.datamodule.val_fraction, tested.datamodule.seed) == (32, 0.2, 3)
    # a class named on the command line: that class from its own defaults, as before
    named = ASSoftmaxCLI(args=["validate", f"--ckpt_path={checkpoint}", "--data=Digits", *QUIET])
    assert (named.datamodule.batch_size, named.datamodule.val_fraction, named.datamodule.seed) == (64, 0.15, 0)
    # a class named in a config file counts the same
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  class_path: Digits\n  init_args:\n    test_fraction: 0.3\n")
    caplog.clear()
    from_file = ASSoftmaxCLI(args=["test", f"--config={config}", f"--ckpt_path={checkpoint}", *QUIET])
    assert (from_file.datamodule.val_fraction, from_file.datamodule.test_fraction) == (0.15, 0.3)
    assert "data of the checkpoint's fit" not in caplog.text


def test_a_checkpoint_without_a_data_config_leaves_the_arguments_alone(tmp_path):
    from lightning_assoftmax.cli import _with_checkpoint_data

    data = bundled_data.Digits(batch_size=64)
    model = bundled_models.ImageClassifier(num_classes=10, channels=4)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    checkpoint = str(next(tmp_path.rglob("*.ckpt")))
    arguments = ["test", f"--ckpt_path={checkpoint}"]
    subcommands = ("fit", "validate", "test", "predict", "compare")
    assert _with_checkpoint_data(arguments, subcommands) is None  # a checkpoint saved outside the CLI: nothing stored
    assert _with_checkpoint_data(["fit", f"--ckpt_path={checkpoint}"], subcommands) is None  # resuming a fit: untouched
    assert _with_checkpoint_data(["test", "--ckpt_path", str(tmp_path / "missing.ckpt")], subcommands) is None


def test_a_weights_only_checkpoint_remembers_its_data_too(tmp_path, caplog):
    # the ready configs save weights only: Lightning then skips the callbacks' checkpoint hooks
    fitted = ASSoftmaxCLI(args=["fit", *DIGITS_FIT, "--trainer.callbacks+=ModelCheckpoint",
                                "--trainer.callbacks.save_weights_only=true", "--trainer.callbacks.dirpath=weights"])
    checkpoint = next((tmp_path / "weights").glob("*.ckpt"))
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in stored
    assert stored["lightning_assoftmax_data"]["init_args"]["test_fraction"] == 0.25
    # the fit is over: the module's own hook is back
    assert "on_save_checkpoint" not in vars(fitted.model)
    tested = ASSoftmaxCLI(args=["test", f"--ckpt_path={checkpoint}", *QUIET])
    assert (tested.datamodule.test_fraction, tested.datamodule.seed) == (0.25, 3)
