"""The ``lightning-assoftmax`` entry point: config parsing, short names, links, errors, end to end."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import lightning_assoftmax
import lightning_assoftmax.callbacks as bundle_callbacks
from lightning_assoftmax.cli import ASSoftmaxCLI, main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = {
    "bbc_news.yaml": ("TextClassifier", "BBCNews"),
    "bbc_news_minilm.yaml": ("TextClassifier", "BBCNews"),
    "bbc_tokens.yaml": ("TokenClassifier", "BBCNewsTokens"),
    "clinc150.yaml": ("TextClassifier", "CLINC150"),
    "clinc150_minilm.yaml": ("TextClassifier", "CLINC150"),
    "digits.yaml": ("ImageClassifier", "Digits"),
    "paper_protocol_banking77.yaml": ("TextClassifier", "Banking77"),
    "paper_protocol_clinc150.yaml": ("TextClassifier", "CLINC150"),
}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


pytestmark = pytest.mark.usefixtures("cli_isolated")


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        ASSoftmaxCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _fit(args: list[str]) -> ASSoftmaxCLI:
    return ASSoftmaxCLI(args=["fit", "--trainer.logger=false", "--trainer.enable_checkpointing=false", *QUIET, *args])


def _summary(out: str) -> dict[str, str]:
    """The rows of the table printed after fit."""
    table = out.split("Run summary: ", 1)[1].splitlines()[2:]
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table if "  " in line]
    return {name: value for name, value in rows}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], value) for name, value in model.state_dict().items() if name in before)


# -- parsing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_print_config_of_each_example(name, capsys):
    config = _print_config(["--config", str(EXAMPLES / name)], capsys)
    model, data = CONFIGS[name]
    assert config["model"]["class_path"] == f"lightning_assoftmax.models.{model}"
    assert config["data"]["class_path"] == f"lightning_assoftmax.data.{data}"
    assert 0.0 <= config["model"]["init_args"]["delta"] <= 1.0
    # linked from the datamodule, so not part of the config
    assert "num_classes" not in config["model"]["init_args"]


def test_example_configs_are_all_covered():
    assert sorted(path.name for path in EXAMPLES.glob("*.yaml")) == sorted(CONFIGS)


def test_defaults_are_text_classifier_on_bbc_news(capsys):
    config = _print_config([], capsys)
    assert config["model"]["class_path"] == "lightning_assoftmax.models.TextClassifier"
    assert config["data"]["class_path"] == "lightning_assoftmax.data.BBCNews"
    assert config["seed_everything"] == 0


def test_the_bundle_exports_its_callbacks():
    assert {"AdaptiveGradAccumulation", "DeltaWarmup", "LossAccuracyCorrelation"} <= set(bundle_callbacks.__all__)


@pytest.mark.parametrize("callback", sorted(bundle_callbacks.__all__))
def test_bundle_callbacks_resolve_by_short_name(callback, capsys):
    config = _print_config(["--model=ImageClassifier", "--data=Digits", f"--trainer.callbacks+={callback}"], capsys)
    (entry,) = config["trainer"]["callbacks"]
    assert entry["class_path"].startswith("lightning_assoftmax.") and entry["class_path"].endswith(f".{callback}")
    assert import_module(entry["class_path"].rsplit(".", 1)[0]).__dict__[callback] is getattr(bundle_callbacks, callback)


def test_callback_arguments_on_the_command_line(capsys):
    config = _print_config(
        ["--trainer.callbacks+=DeltaWarmup", "--trainer.callbacks.warmup_fraction=0.25"], capsys
    )
    assert config["trainer"]["callbacks"][0]["init_args"]["warmup_fraction"] == 0.25


def test_loss_option_reaches_the_model(capsys):
    config = _print_config(["--model.loss=sparsemax"], capsys)
    assert config["model"]["init_args"]["loss"] == "sparsemax"


def test_delta_outside_unit_interval_fails_clearly(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  class_path: ImageClassifier\n  init_args:\n    delta: 2\ndata: Digits\n")
    with pytest.raises(SystemExit) as exit_info:
        ASSoftmaxCLI(args=["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "delta must lie in [0, 1], got 2.0" in err
    assert "Traceback" not in err and "Union" not in err


def test_wrongly_typed_loss_keyword_fails_clearly(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model:\n  class_path: ImageClassifier\n  init_args:\n    loss: sparse_softmax\n"
        "    loss_kwargs:\n      k: 2.5\ndata: Digits\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        ASSoftmaxCLI(args=["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: TypeError: sparse_softmax: k must be a positive integer, got 2.5" in err
    assert "Traceback" not in err


def test_bad_data_files_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ASSoftmaxCLI(args=["fit", "--data=TextFile", "--data.train_file=missing.csv"])
    assert exit_info.value.code == 2
    assert "error: FileNotFoundError: text file 'missing.csv' does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n')
    with pytest.raises(SystemExit):
        ASSoftmaxCLI(args=["fit", "--data=TextFile", "--data.train_file=bad.jsonl"])
    assert "error: ValueError: bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_sizes_are_linked_from_the_datamodule():
    cli = ASSoftmaxCLI(args=["--model=TokenClassifier", "--data=BBCNewsTokens"], run=False)
    assert cli.model.output.out_features == 30522 == cli.datamodule.num_classes
    assert cli.model.embedding.num_embeddings == 30522
    cli = ASSoftmaxCLI(args=["--model=ImageClassifier", "--data=Digits"], run=False)
    assert cli.model.net[-1].out_features == 10


def test_module_and_console_script_entry_points():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["lightning-assoftmax"].split(":")
    assert getattr(import_module(module), function) is main
    # the package under test, wherever the working directory is
    source = str(Path(lightning_assoftmax.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_assoftmax", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "python -m lightning_assoftmax" in result.stdout
    assert all(command in result.stdout for command in ("fit", "validate", "test", "predict"))


# -- short end-to-end runs, one per model/data pair -----------------------------------------------
def test_fit_image_classifier_on_digits_learns_and_prints_summary(tmp_path, capsys):
    args = ["--config", str(EXAMPLES / "digits.yaml"), "--trainer.max_epochs=3", *QUIET]
    cli = ASSoftmaxCLI(
        args=["fit", *args, "--trainer.enable_checkpointing=true", "--trainer.callbacks+=AdaptiveGradAccumulation"]
    )
    metrics = cli.trainer.callback_metrics
    assert metrics["val/acc"] > 0.8
    summary = _summary(capsys.readouterr().out)
    assert float(summary["val/acc"]) == pytest.approx(float(metrics["val/acc"]), abs=1e-4)
    assert 0.0 <= float(summary["val/masked_ratio"]) <= 1.0
    accumulation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "AdaptiveGradAccumulation")
    assert summary["accumulation window"] == str(accumulation.accumulate_grad_batches)
    assert summary["optimizer steps"].startswith(f"{cli.trainer.global_step} for {3 * 20} batches")
    assert -1.0 <= float(summary["val/loss_acc_pearson"]) <= 1.0
    assert Path(summary["figure"]).is_file()
    metrics_csv = Path(summary["metrics CSV"])
    assert metrics_csv == Path(cli.trainer.logger.experiment.metrics_file_path) and metrics_csv.is_file()
    with metrics_csv.open() as handle:
        logged = [row["val/acc"] for row in csv.DictReader(handle) if row.get("val/acc")]
    assert len(logged) == 3 and math.isclose(float(logged[-1]), float(metrics["val/acc"]), rel_tol=1e-6)

    # the checkpoint loads back, through the CLI and directly (no stray linked keys in its hparams)
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    tested = ASSoftmaxCLI(args=["test", *args, f"--ckpt_path={checkpoint}", "--trainer.default_root_dir=t"])
    assert math.isclose(float(tested.trainer.callback_metrics["test/acc"]), _accuracy(cli.model, cli.datamodule), rel_tol=1e-6)
    loaded = type(cli.model).load_from_checkpoint(checkpoint)
    assert "vocab_size" not in loaded.hparams and loaded.hparams["num_classes"] == 10


def test_skip_masked_samples_from_the_command_line(capsys):
    args = ["--config", str(EXAMPLES / "digits.yaml"), "--trainer.max_epochs=4", "--trainer.callbacks+=SkipMaskedSamples"]
    cli = _fit([*args, "--trainer.callbacks.max_rest=2"])
    skipping = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "SkipMaskedSamples")
    assert skipping.max_rest == 2
    info = skipping.summary()
    assert info["full_batches"] == 4 * 20 and info["batches_run"] < info["full_batches"]
    row = _summary(capsys.readouterr().out)["training batches"]
    assert row.startswith(f"{info['batches_run']} of 80 with every sample")


def _accuracy(model, datamodule) -> float:
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(-1) == y).sum().item() for x, y in datamodule.test_dataloader()]
    return sum(hits) / len(datamodule.datasets["test"])


def test_fit_text_classifier_on_bbc_news_subset():
    limits = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.max_epochs=1"]
    cli = ASSoftmaxCLI(args=["--data.max_length=32", "--data.batch_size=8", *limits, *QUIET], run=False)
    before = {k: v.clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3 and _changed(before, cli.model)
    assert cli.model.head[-1].out_features == 5
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_fit_minilm_backbone_on_bbc_news_subset():
    cli = _fit(
        [
            "--config", str(EXAMPLES / "bbc_news_minilm.yaml"), "--trainer.logger=false",
            "--data.max_length=16", "--data.batch_size=4", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=null", "--trainer.num_sanity_val_steps=0",
        ]
    )
    assert cli.model.encoder is not None
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0
    assert cli.trainer.global_step == 2


def test_fit_token_classifier_on_bbc_tokens_subset():
    cli = _fit(
        [
            "--model=TokenClassifier", "--data=BBCNewsTokens", "--data.seq_len=16", "--data.batch_size=4",
            "--model.embed_dim=16", "--model.hidden_dim=16",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.max_epochs=1",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert 9.0 < float(metrics["val/loss"]) < 11.0  # about log(30522) = 10.3 after two steps
    assert float(metrics["val/masked_ratio"]) < 0.5


@pytest.mark.parametrize("multilabel", [False, True])
def test_fit_text_classifier_on_a_text_file(tmp_path, multilabel):
    topics = {"sport": "the team won the match", "money": "shares and markets fell", "art": "a film and a song"}
    lines = ["text,label"]
    for i in range(24):
        names = list(topics)[i % 3 : i % 3 + (2 if multilabel else 1)] or ["sport"]
        lines.append(f"\"{' '.join(topics[n] for n in names)} {i}\",{'|'.join(names)}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    cli = _fit(
        [
            "--data=TextFile", f"--data.train_file={tmp_path / 'train.csv'}", f"--data.multilabel={multilabel}",
            "--data.val_fraction=0.25", "--data.batch_size=6", "--model.embeddings=null", "--model.embed_dim=16",
            "--trainer.max_epochs=2",
        ]
    )
    assert cli.model.as_softmax_multilabel is multilabel
    assert cli.model.head[-1].out_features == len(cli.datamodule.class_names)
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0


def test_validate_test_and_predict_subcommands():
    common = ["--model=ImageClassifier", "--data=Digits", *QUIET, "--trainer.logger=false"]
    for subcommand in ("validate", "test"):
        cli = ASSoftmaxCLI(args=[subcommand, *common, f"--trainer.default_root_dir={subcommand}"])
        assert f"{'val' if subcommand == 'validate' else 'test'}/acc" in cli.trainer.callback_metrics
    cli = ASSoftmaxCLI(args=["predict", *common, "--trainer.limit_predict_batches=2", "--trainer.default_root_dir=p"])
    predictions = cli.trainer.predict_loop.predictions
    assert len(predictions) == 2 and predictions[0].dtype == torch.long


# -- the main job ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_config_end_to_end(capsys):
    main(["fit", "--config", str(EXAMPLES / "bbc_news.yaml")])
    out = capsys.readouterr().out
    summary = _summary(out)
    assert float(summary["val/acc"]) >= 0.95
    assert 0.0 < float(summary["val/masked_ratio"]) < 1.0
    assert float(summary["val/loss"]) < float(summary["val/ce_loss"])
    assert float(summary["val/loss_acc_pearson"]) < 0
    # nearly every training sample is masked after the first epoch: the window grows to max_steps
    assert summary["accumulation window"] == "2"
    taken, plain = map(int, re.match(r"(\d+) for (\d+) batches", summary["optimizer steps"]).groups())
    assert plain == 6 * 49 and plain / 2 <= taken < plain
    for key in ("metrics CSV", "figure"):
        assert Path(summary[key].strip()).is_file(), key
