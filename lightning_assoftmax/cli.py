"""``lightning-assoftmax``: the ``LightningCLI`` entry point with the bundle's models, data and callbacks.

Examples::

    lightning-assoftmax fit --config examples/bbc_news.yaml
    lightning-assoftmax compare --config examples/bbc_news.yaml --arms softmax,as_softmax --seeds 3 --out runs/cmp
    lightning-assoftmax fit --model=TextClassifier --data=BBCNews --model.delta=0.2 \\
        --trainer.callbacks+=DeltaWarmup --trainer.callbacks.warmup_fraction=0.1
    python -m lightning_assoftmax fit --model=ImageClassifier --data=Digits --print_config

Model and data are chosen by class; short names resolve for every imported ``LightningModule``,
``LightningDataModule`` and ``Callback`` (the bundle's are imported here), full class paths for
your own; a chosen class starts from its own defaults. The datamodule's ``num_classes``,
``vocab_size``, ``multilabel``, ``class_counts`` and ``class_names`` are copied into the model's
arguments of the same name. ``fit`` without a stopping point stops after
:data:`DEFAULT_MAX_EPOCHS` epochs. Each run writes into a folder named for its loss
(``lightning_logs/<loss>/version_<n>``) with a ``metrics.csv`` beside any logger; ``test`` and
``predict`` of a checkpoint write into ``<run>/test`` and ``<run>/predict`` of the checkpoint's run,
``predict`` a predictions file with label names; without ``--data`` they use the data of the
checkpoint's fit. After ``fit`` a summary table is printed.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

import lightning_assoftmax

# Imported so that their classes resolve by short name (jsonargparse looks among loaded subclasses).
from lightning_assoftmax.callbacks import (  # noqa: F401
    AdaptiveGradAccumulation,
    CompactProgressBar,
    DeltaWarmup,
    LossAccuracyCorrelation,
    MarginAnnealing,
    PredictionWriter,
    SkipMaskedSamples,
)
from lightning_assoftmax.compare.cli import CompareSubcommand
from lightning_assoftmax.data import (  # noqa: F401
    CLINC150,
    HWU64,
    Banking77,
    BBCNews,
    BBCNewsTokens,
    DBpedia219,
    Digits,
    TextFile,
)
from lightning_assoftmax.models import ImageClassifier, TextClassifier, TokenClassifier  # noqa: F401

__all__ = ["DATA_CONFIG_KEY", "DEFAULT_MAX_EPOCHS", "ASSoftmaxCLI", "DataConfigInCheckpoint", "main", "run_summary"]

#: Epochs ``fit`` runs when no stopping point (``max_epochs``, ``max_steps``, ``max_time``) is given;
#: Lightning's own default would be 1000.
DEFAULT_MAX_EPOCHS = 10

DESCRIPTION = (
    "lightning-assoftmax: train, test and predict with Adaptive Sparse Softmax (AS-Softmax) and the "
    "softmax family on PyTorch Lightning. Ready-made models (TextClassifier, TokenClassifier, "
    "ImageClassifier), offline data (BBCNews, BBCNewsTokens, CLINC150, Banking77, HWU64, DBpedia219, "
    "Digits, TextFile for your own CSV / JSON Lines) and callbacks (AdaptiveGradAccumulation, "
    "SkipMaskedSamples, DeltaWarmup, LossAccuracyCorrelation, MarginAnnealing, PredictionWriter) by "
    f"short name. fit stops after {DEFAULT_MAX_EPOCHS} epochs unless --trainer.max_epochs, max_steps or "
    "max_time is given. Each run writes into lightning_logs/<loss>/version_<n> (config.yaml, "
    "metrics.csv, checkpoints); test and predict with --ckpt_path write next to that checkpoint's run and "
    "use the data of its fit unless --data names a class."
)

# Datamodule attributes copied into the model's init arguments of the same name (when it has one),
# with the value used when a datamodule lacks the attribute. ``class_counts`` feeds the
# frequency-based output layers (``--model.head adaptive``).
MODEL_ARGS_FROM_DATA: dict[str, Any] = {
    "num_classes": None,
    "vocab_size": None,
    "multilabel": False,
    "class_counts": None,
    "class_names": None,
}

_SUMMARY_METRICS = ("val/acc", "val/loss", "val/ce_loss", "val/masked_ratio", "train/masked_ratio_epoch")
_CORRELATION_METRICS = (
    "val/loss_acc_pearson",
    "val/ce_loss_acc_pearson",
    "val/loss_acc_spearman",
    "val/ce_loss_acc_spearman",
)
#: Checkpoint key under which a ``fit`` from the command line stores its datamodule's config
#: (``class_path`` and ``init_args``), so that ``test --ckpt_path`` alone tests on the same data.
DATA_CONFIG_KEY = "lightning_assoftmax_data"
# User-facing errors raised while building the model or data from a config (bad values, bad files).
_CONFIG_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)


def _from_data(name: str, default: Any) -> Callable[[L.LightningDataModule], Any]:
    def read(datamodule: L.LightningDataModule) -> Any:
        value = getattr(datamodule, name, default)
        # A list of str: stored as is in the checkpoint and hparams.yaml (a tuple would not be).
        return [str(item) for item in value] if name == "class_names" and value is not None else value

    read.__name__ = f"datamodule_{name}"
    return read


def init_parameter_names(cls: type) -> set[str]:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up the MRO (as jsonargparse does
    for cooperative ``super().__init__(**kwargs)``), up to ``LightningModule``."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base in (L.LightningModule, object) or "__init__" not in vars(base):
            continue
        parameters = inspect.signature(base.__init__).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    names.discard("self")
    return names


def _raised_by_jsonargparse(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


def _unwrap(error: BaseException) -> BaseException:
    """The error a model or datamodule raised, under jsonargparse's re-raising wrappers."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if not _raised_by_jsonargparse(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return error


class ChosenClassDefaultsParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose default ``model`` / ``data`` hold only the class.

    When the class changes (``--data=TextFile`` over the default ``BBCNews``), jsonargparse keeps
    the earlier class's ``init_args`` that the new class also accepts; with the default class's
    defaults in place, ``TextFile`` would silently get ``BBCNews``'s ``val_fraction`` and
    ``max_length``. Without them the chosen class starts from its own defaults (filled in at the end
    of parsing), and a value given on the command line still carries over as jsonargparse intends.
    """

    def get_defaults(self, *args: Any, **kwargs: Any) -> Namespace:
        defaults = super().get_defaults(*args, **kwargs)
        for key in ("model", "data"):
            value = defaults.get(key)
            if isinstance(value, Namespace) and "init_args" in value:
                del value["init_args"]
        return defaults


class RunConfigCallback(SaveConfigCallback):
    """Saves the run's config as ``config.yaml`` in its log directory and says where.

    A fit with a logger writes into its own new version folder. Without a logger every run in
    ``default_root_dir`` shares that folder, and ``test`` / ``predict`` of a checkpoint write into
    ``<run>/<subcommand>``: the file there is overwritten, so the same command can run twice.

    Attributes:
        path: where the config was written (``None`` before).
    """

    path: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        self.overwrite = self.overwrite or trainer.logger is None or stage != "fit"
        super().setup(trainer, pl_module, stage)
        self.path = os.path.join(trainer.log_dir or trainer.default_root_dir, self.config_filename)
        rank_zero_info(f"{getattr(stage, 'value', stage)}: config saved to {self.path}")


class DataConfigInCheckpoint(Callback):
    """Writes the datamodule's config (``class_path``, ``init_args``) into every checkpoint of a fit.

    ``validate`` / ``test`` / ``predict`` with ``--ckpt_path`` and no ``--data`` (on the command line
    or in a config file) then use the same data class and arguments, as Lightning already does for
    the model's. Added by :class:`ASSoftmaxCLI` to ``fit``; the checkpoint's other contents are
    unchanged. Weights-only checkpoints (``ModelCheckpoint(save_weights_only=True)``, as the ready
    configs save) skip the callbacks' hooks but not the module's, so the config is written from the
    module's ``on_save_checkpoint`` for the length of the fit.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self._patched: L.LightningModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._patched is not None:
            return
        own_hook = pl_module.on_save_checkpoint

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            own_hook(checkpoint)
            checkpoint[DATA_CONFIG_KEY] = self.data

        pl_module.on_save_checkpoint = on_save_checkpoint
        self._patched = pl_module

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._patched is not None:
            vars(self._patched).pop("on_save_checkpoint", None)
            self._patched = None


class ASSoftmaxCLI(CompareSubcommand, LightningCLI):
    """``LightningCLI`` with any ``LightningModule`` / ``LightningDataModule`` chosen by class.

    Defaults: ``--model=TextClassifier --data=BBCNews`` and ``--seed_everything=0``; a chosen
    class comes with its own defaults. A value that the model or datamodule rejects (``delta: 2``,
    a missing file) ends with a one-line error, not a traceback.

    Runs:

    * ``fit`` with no ``max_epochs``, ``max_steps`` or ``max_time`` stops after
      :data:`DEFAULT_MAX_EPOCHS` epochs (and says so).
    * Without a logger configured, a run logs to TensorBoard (when installed) and CSV in
      ``<default_root_dir>/lightning_logs/<loss>/version_<n>``, ``<loss>`` naming the loss and its
      key settings (``as_softmax-delta0.1``). A configured logger is kept, with a ``CSVLogger``
      beside it (same folder) unless one is configured: the summary reads ``metrics.csv``.
    * ``validate`` / ``test`` / ``predict`` with ``--ckpt_path`` write into ``<run>/<subcommand>``
      of the checkpoint's run folder (the parent of its ``checkpoints`` folder), not a new version;
      the checkpoint's ``class_names`` go to a datamodule that takes them (``TextFile`` then needs
      no training file). Without ``--data`` they use the data class and arguments the checkpoint's
      fit used (:class:`DataConfigInCheckpoint`), as they use its model.
    * ``predict`` writes ``predictions.csv`` (:class:`~lightning_assoftmax.callbacks.PredictionWriter`)
      unless a prediction writer is configured.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", ChosenClassDefaultsParser)
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        parser_kwargs.setdefault("description", DESCRIPTION)
        parser_kwargs.setdefault("version", lightning_assoftmax.__version__)
        kwargs["parser_kwargs"] = parser_kwargs
        self._fit_started = math.nan
        self._default_stop = False
        self._data_note = ""
        super().__init__(L.LightningModule, L.LightningDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": "TextClassifier", "data": "BBCNews"})
        for name, default in MODEL_ARGS_FROM_DATA.items():
            parser.link_arguments(
                "data", f"model.init_args.{name}", compute_fn=_from_data(name, default), apply_on="instantiate"
            )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        with_data = None
        if not isinstance(given, (dict, Namespace)):
            with_data = _with_checkpoint_data(list(map(str, given)), tuple(getattr(self, "_subcommand_parsers", ())))
        if with_data is None:
            super().parse_arguments(parser, args)
            return
        arguments, self._data_note = with_data
        self.config = parser.parse_args(arguments)

    def before_instantiate_classes(self) -> None:
        if self._data_note:
            rank_zero_info(self._data_note)
        self._class_names_from_checkpoint()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _CONFIG_ERRORS as error:
            inner = _unwrap(error)
            if not isinstance(inner, _CONFIG_ERRORS):
                raise
            self._parser(self.subcommand).error(f"{type(inner).__name__}: {inner}")
        self._drop_unused_links_from_hparams()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if self.subcommand in ("fit", "compare") and _no_stopping_point(config):
            kwargs["max_epochs"] = DEFAULT_MAX_EPOCHS
            self._default_stop = True
        kwargs["logger"] = self._run_loggers(config.get("logger"), config.get("default_root_dir"))
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        extra = []
        if self.subcommand == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in callbacks):
            extra.append(PredictionWriter())
        # Lightning's own bar cuts `train/masked_ratio` off on an 80-column terminal.
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            extra.append(CompactProgressBar())
        if self.subcommand == "fit":
            self._dump_config()
            data = self.config_dump.get("data")
            if isinstance(data, dict) and "class_path" in data:
                extra.append(DataConfigInCheckpoint(data))
        else:
            # A checkpoint's ModelCheckpoint state names the fit's folder; outside fit it is not used.
            warnings.filterwarnings("ignore", message=r".*dirpath has changed from.*")
        if extra:
            kwargs["callbacks"] = [*callbacks, *extra]
        return super().instantiate_trainer(**kwargs)

    # -- where a run writes -------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        """The loss and its key settings as a folder name, e.g. ``as_softmax-delta0.1``."""
        description = getattr(self.model, "as_softmax_loss_description", None)
        if not isinstance(description, str):
            return type(self.model).__name__.lower() if self.model is not None else "run"
        return _slug(description)

    def _checkpoint_path(self) -> Path | None:
        if self.subcommand in (None, "fit"):
            return None
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        return Path(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else None

    def _run_loggers(self, logger: Any, root: str | None) -> Any:
        """The loggers of this run (see the class docstring); ``False`` stays ``False``."""
        if logger is False:
            return False
        root = root or os.getcwd()
        checkpoint = self._checkpoint_path()
        configured = [] if logger in (None, True) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
        if checkpoint is not None:
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
            # version "" puts the files directly in <run>/<subcommand>, not in a version_<n> inside it.
            place = {"save_dir": str(run_dir), "name": self.subcommand, "version": ""}
            kinds = {type(lg) for lg in configured if isinstance(lg, (CSVLogger, TensorBoardLogger))}
            if not configured:
                kinds = {_default_logger_class()}
            loggers = [lg for lg in configured if not isinstance(lg, (CSVLogger, TensorBoardLogger))]
            loggers += [kind(**place) for kind in sorted(kinds, key=lambda k: k.__name__, reverse=True)]
        elif not configured:
            save_dir = os.path.join(root, "lightning_logs")
            version = CSVLogger(save_dir, name=self.run_name).version  # the next free version_<n>
            place = {"save_dir": save_dir, "name": self.run_name, "version": version}
            loggers = [_default_logger_class()(**place)]
        else:
            loggers = configured
        if not any(isinstance(lg, CSVLogger) for lg in loggers):
            first = loggers[0]
            if isinstance(first, TensorBoardLogger):
                place = {"save_dir": first.save_dir, "name": first.name, "version": first.version}
            else:
                save_dir = os.path.join(root, "lightning_logs")
                place = {"save_dir": save_dir, "name": self.run_name, "version": CSVLogger(save_dir, name=self.run_name).version}
            loggers.append(CSVLogger(**place))
        for csv_logger in (lg for lg in loggers if isinstance(lg, CSVLogger)):
            if any(lg is not csv_logger and getattr(lg, "log_dir", None) == csv_logger.log_dir for lg in loggers):
                # The other logger writes there first; the CSV logger then says the folder is not
                # empty and that "previous log files will be deleted", while it only writes its own.
                warnings.filterwarnings(
                    "ignore", message=rf"Experiment logs directory {re.escape(csv_logger.log_dir)} exists and is not empty"
                )
        return loggers

    def _class_names_from_checkpoint(self) -> None:
        """Gives the checkpoint's ``class_names`` to a datamodule that takes them and has none."""
        checkpoint = self._checkpoint_path()
        if checkpoint is None:
            return
        data = self.config[self.subcommand].get("data")
        init_args = data.get("init_args") if isinstance(data, Namespace) else None
        if init_args is None or "class_names" not in init_args or init_args["class_names"] is not None:
            return
        stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        names = stored.get("hyper_parameters", {}).get("class_names")
        if names:
            init_args["class_names"] = [str(name) for name in names]

    def _drop_unused_links_from_hparams(self) -> None:
        # LightningCLI records every applied link target in the model's saved hyperparameters,
        # also one the model has no argument for (ImageClassifier has no vocab_size); such a key
        # makes the checkpoint fail to load (`--ckpt_path`, `load_from_checkpoint`).
        accepted = init_parameter_names(type(self.model))
        for attribute in ("_hparams", "_hparams_initial"):
            hparams = getattr(self.model, attribute, None)
            if hparams is None:
                continue
            for name in MODEL_ARGS_FROM_DATA:
                if name not in accepted:
                    hparams.pop(name, None)

    # -- subcommand hooks ---------------------------------------------------------------------
    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()
        if self._default_stop:
            rank_zero_info(
                f"fit: no stopping point given, training stops after {DEFAULT_MAX_EPOCHS} epochs "
                "(set --trainer.max_epochs, --trainer.max_steps or --trainer.max_time, or add EarlyStopping)."
            )

    def after_fit(self) -> None:
        elapsed = time.perf_counter() - self._fit_started
        _print_summary(run_summary(self.trainer), run_title(self.model, self.datamodule, f"fit, {elapsed:.1f} s"))


def _option_values(arguments: list[str], *names: str) -> list[str]:
    """The values given to options ``names`` (``--name=value`` or ``--name value``)."""
    values = []
    for i, argument in enumerate(arguments):
        for name in names:
            if argument.startswith(name + "="):
                values.append(argument[len(name) + 1 :])
            elif argument == name and i + 1 < len(arguments):
                values.append(arguments[i + 1])
    return values


def _read_config(path: str) -> dict[str, Any]:
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}  # the parser reports it
    return content if isinstance(content, dict) else {}


def _with_checkpoint_data(arguments: list[str], subcommands: tuple[str, ...]) -> tuple[list[str], str] | None:
    """``validate`` / ``test`` / ``predict`` with a checkpoint and no data class named: the arguments
    with the checkpoint's data config (:data:`DATA_CONFIG_KEY`) placed first, so that ``--data.*``
    options given still override it; ``None`` when the arguments stay as they are. ``subcommands``:
    the CLI's subcommand names (the first argument among them is the subcommand)."""
    position = next((i for i, a in enumerate(arguments) if a in subcommands), None)
    if position is None or arguments[position] not in ("validate", "test", "predict"):
        return None
    subcommand, before, after = arguments[position], arguments[:position], arguments[position + 1 :]
    configs = [_read_config(p) for p in _option_values(after, "--config", "-c")]
    top_level = [c.get(subcommand) or {} for c in map(_read_config, _option_values(before, "--config", "-c"))]
    named = _option_values(after, "--data") or any(isinstance(c, dict) and c.get("data") for c in configs + top_level)
    checkpoints = _option_values(after, "--ckpt_path") or [c["ckpt_path"] for c in configs if c.get("ckpt_path")]
    if named or not checkpoints or not Path(str(checkpoints[-1])).is_file():
        return None
    checkpoint = torch.load(checkpoints[-1], map_location="cpu", weights_only=True, mmap=True)
    stored = checkpoint.get(DATA_CONFIG_KEY)
    if not isinstance(stored, dict) or "class_path" not in stored:
        return None
    stored = {**stored, "init_args": dict(stored.get("init_args") or {})}
    init_args, gone = stored["init_args"], ""
    train_file = init_args.get("train_file")
    names = checkpoint.get("hyper_parameters", {}).get("class_names")
    if train_file and not Path(train_file).exists() and names and init_args.get("class_names") is None:
        # A training file moved or deleted since: the checkpoint's label names stand in for it
        # (given to the datamodule by ASSoftmaxCLI._class_names_from_checkpoint).
        init_args["train_file"] = None
        gone = f"; train_file {train_file} is gone, the checkpoint's class names stand in for it"
    values = ", ".join(f"{k}={v!r}" for k, v in init_args.items() if v is not None)
    note = (
        f"{subcommand}: the data of the checkpoint's fit, {stored['class_path'].rsplit('.', 1)[-1]}({values}), "
        f"with any --data.* option given here on top{gone}."
    )
    return [*before, subcommand, f"--data={json.dumps(stored)}", *after], note


def _no_stopping_point(trainer_config: dict[str, Any]) -> bool:
    return (
        trainer_config.get("max_epochs") is None
        and trainer_config.get("max_steps", -1) in (-1, None)
        and trainer_config.get("max_time") is None
        and not trainer_config.get("fast_dev_run")
    )


def _default_logger_class() -> type[Logger]:
    # Lightning's own choice for Trainer(logger=True).
    return TensorBoardLogger if (_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE) else CSVLogger


def _slug(description: str) -> str:
    """``as_softmax(delta=0.1)`` -> ``as_softmax-delta0.1``: a folder name that keeps the settings."""
    name, _, settings = description.partition("(")
    parts = [name] + [re.sub(r"\s+", "", part).replace("=", "") for part in settings.rstrip(")").split(",") if part.strip()]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "-".join(parts))


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def run_title(model: Any, datamodule: Any, detail: str) -> str:
    """The summary's title: the loss and its key settings, the model and the data, ``detail``."""
    loss = getattr(model, "as_softmax_loss_description", None)
    parts = [f"loss {loss}" if isinstance(loss, str) else None, type(model).__name__ if model is not None else None]
    if datamodule is not None:
        parts.append(f"on {type(datamodule).__name__}")
    described = " ".join(part for part in parts[1:] if part)
    head = ", ".join(part for part in (parts[0], described) if part)
    return f"Run summary: {head} ({detail})"


def run_summary(trainer: L.Trainer) -> list[tuple[str, str]]:
    """Rows ``(name, value)`` describing a finished run: final validation metrics, the optimizer
    steps (``trainer.global_step``) and the last accumulation window, the training batches run
    (``SkipMaskedSamples``), the loss/accuracy correlations, and the files written: run folder,
    config, metrics CSV, figure, checkpoint with its epoch and step ("n/a" if absent)."""
    metrics = trainer.callback_metrics
    rows = [(name, _format(metrics.get(name))) for name in _SUMMARY_METRICS]
    accumulation = next((cb for cb in trainer.callbacks if isinstance(cb, AdaptiveGradAccumulation)), None)
    if accumulation is not None:
        # The callback, not the Trainer: it puts accumulate_grad_batches back to 1 after fit.
        steps = accumulation.summary()
        taken, plain = steps["optimizer_steps"], steps["plain_optimizer_steps"]
        saved = f" ({100.0 * (1 - taken / plain):.0f}% fewer)" if plain else ""
        rows.append(("accumulation window", str(accumulation.accumulate_grad_batches)))
        rows.append(("optimizer steps", f"{taken} for {plain} batches{saved}"))
    else:
        rows += [("accumulation window", "n/a"), ("optimizer steps", str(trainer.global_step))]
    skipping = next((cb for cb in trainer.callbacks if isinstance(cb, SkipMaskedSamples)), None)
    if skipping is not None:
        batches = skipping.summary()
        run, full = batches["batches_run"], batches["full_batches"]
        saved = f" ({100.0 * batches['saved_share']:.0f}% fewer)" if full else ""
        rows.append(("training batches", f"{run} of {full} with every sample{saved}"))
    else:
        rows.append(("training batches", "n/a"))
    rows.extend((name, _format(metrics.get(name))) for name in _CORRELATION_METRICS)
    rows.append(("run folder", str(trainer.log_dir) if trainer.loggers else "n/a"))
    config = next((cb.path for cb in trainer.callbacks if isinstance(cb, RunConfigCallback) and cb.path), None)
    rows.append(("config", config or "n/a"))
    csv_path = next(
        (Path(lg.experiment.metrics_file_path) for lg in trainer.loggers if isinstance(lg, CSVLogger)), None
    )
    rows.append(("metrics CSV", str(csv_path) if csv_path is not None else "n/a"))
    figure = next(
        (cb.figure_path for cb in trainer.callbacks if isinstance(cb, LossAccuracyCorrelation) and cb.figure_path),
        None,
    )
    rows.append(("figure", str(figure) if figure else "n/a"))
    rows.append(("checkpoint", _checkpoint_row(trainer.checkpoint_callback)))
    return rows


def _checkpoint_row(checkpoint: Any) -> str:
    """The checkpoint kept (the best one when a metric is monitored, else the last), with the
    epoch and optimizer step it holds, which can be earlier than the end of the run."""
    if not isinstance(checkpoint, ModelCheckpoint):
        return "n/a"
    path = checkpoint.best_model_path or checkpoint.last_model_path
    if not path or not os.path.isfile(path):
        return "n/a"
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    held = f"epoch {stored.get('epoch')}, optimizer step {stored.get('global_step')}"
    if checkpoint.monitor and checkpoint.best_model_path:
        held = f"best {checkpoint.monitor} {_format(checkpoint.best_model_score)}, {held}"
    return f"{path} ({held})"


@rank_zero_only
def _print_summary(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(name) for name, _ in rows)
    line = "-" * max(len(title), width + 2 + max(len(value) for _, value in rows))
    print(f"\n{title}\n{line}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(line, flush=True)


def main(args: Any = None) -> None:
    """Console entry point (``lightning-assoftmax``, ``python -m lightning_assoftmax``)."""
    # The bundled datamodules hold their data in memory: worker processes would not speed them up.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Raised inside Lightning's own loops (torch pytree API change); nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    program = Path(sys.argv[0]).name
    prog = "python -m lightning_assoftmax" if program == "__main__.py" else program
    ASSoftmaxCLI(args=args, parser_kwargs={"prog": prog})
