"""``lightning-assoftmax``: the ``LightningCLI`` entry point with the bundle's models, data and callbacks.

Examples::

    lightning-assoftmax fit --config examples/bbc_news.yaml
    lightning-assoftmax compare --config examples/bbc_news.yaml --arms softmax,as_softmax --seeds 3 --out runs/cmp
    lightning-assoftmax fit --model=TextClassifier --data=BBCNews --model.delta=0.2 \\
        --trainer.callbacks+=DeltaWarmup --trainer.callbacks.warmup_fraction=0.1
    python -m lightning_assoftmax fit --model=ImageClassifier --data=Digits --print_config

Model and data are chosen by class; short names resolve for every imported ``LightningModule``,
``LightningDataModule`` and ``Callback`` (the bundle's are imported here), full class paths for
your own. The datamodule's ``num_classes``, ``vocab_size``, ``multilabel`` and ``class_counts`` are
copied into the model's arguments of the same name. After ``fit`` a summary table is printed.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

# Imported so that their classes resolve by short name (jsonargparse looks among loaded subclasses).
from lightning_assoftmax.callbacks import (  # noqa: F401
    AdaptiveGradAccumulation,
    DeltaWarmup,
    LossAccuracyCorrelation,
    MarginAnnealing,
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

__all__ = ["ASSoftmaxCLI", "main", "run_summary"]

# Datamodule attributes copied into the model's init arguments of the same name (when it has one),
# with the value used when a datamodule lacks the attribute. ``class_counts`` feeds the
# frequency-based output layers (``--model.head adaptive``).
MODEL_ARGS_FROM_DATA: dict[str, Any] = {
    "num_classes": None,
    "vocab_size": None,
    "multilabel": False,
    "class_counts": None,
}

_SUMMARY_METRICS = ("val/acc", "val/loss", "val/ce_loss", "val/masked_ratio", "train/masked_ratio_epoch")
_CORRELATION_METRICS = (
    "val/loss_acc_pearson",
    "val/ce_loss_acc_pearson",
    "val/loss_acc_spearman",
    "val/ce_loss_acc_spearman",
)
# User-facing errors raised while building the model or data from a config (bad values, bad files).
_CONFIG_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)


def _from_data(name: str, default: Any) -> Callable[[L.LightningDataModule], Any]:
    def read(datamodule: L.LightningDataModule) -> Any:
        return getattr(datamodule, name, default)

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


class ASSoftmaxCLI(CompareSubcommand, LightningCLI):
    """``LightningCLI`` with any ``LightningModule`` / ``LightningDataModule`` chosen by class.

    Defaults: ``--model=TextClassifier --data=BBCNews`` and ``--seed_everything=0``. A value that
    the model or datamodule rejects (``delta: 2``, a missing file) ends with a one-line error,
    not a traceback.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        self._fit_started = math.nan
        super().__init__(L.LightningModule, L.LightningDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": "TextClassifier", "data": "BBCNews"})
        for name, default in MODEL_ARGS_FROM_DATA.items():
            parser.link_arguments(
                "data", f"model.init_args.{name}", compute_fn=_from_data(name, default), apply_on="instantiate"
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _CONFIG_ERRORS as error:
            inner = _unwrap(error)
            if not isinstance(inner, _CONFIG_ERRORS):
                raise
            self._parser(self.subcommand).error(f"{type(inner).__name__}: {inner}")
        self._drop_unused_links_from_hparams()

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

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        elapsed = time.perf_counter() - self._fit_started
        _print_summary(run_summary(self.trainer), f"fit, {elapsed:.1f} s")


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def run_summary(trainer: L.Trainer) -> list[tuple[str, str]]:
    """Rows ``(name, value)`` describing a finished run: final validation metrics, the last
    accumulation window, the training batches run (``SkipMaskedSamples``), the loss/accuracy
    correlations and the files written ("n/a" if absent)."""
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
        rows += [("accumulation window", "n/a"), ("optimizer steps", "n/a")]
    skipping = next((cb for cb in trainer.callbacks if isinstance(cb, SkipMaskedSamples)), None)
    if skipping is not None:
        batches = skipping.summary()
        run, full = batches["batches_run"], batches["full_batches"]
        saved = f" ({100.0 * batches['saved_share']:.0f}% fewer)" if full else ""
        rows.append(("training batches", f"{run} of {full} with every sample{saved}"))
    else:
        rows.append(("training batches", "n/a"))
    rows.extend((name, _format(metrics.get(name))) for name in _CORRELATION_METRICS)
    csv_path = next(
        (Path(lg.experiment.metrics_file_path) for lg in trainer.loggers if isinstance(lg, CSVLogger)), None
    )
    rows.append(("metrics CSV", str(csv_path) if csv_path is not None else "n/a"))
    figure = next(
        (cb.figure_path for cb in trainer.callbacks if isinstance(cb, LossAccuracyCorrelation) and cb.figure_path),
        None,
    )
    rows.append(("figure", str(figure) if figure else "n/a"))
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
    rows.append(("checkpoint", best or "n/a"))
    return rows


@rank_zero_only
def _print_summary(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(name) for name, _ in rows)
    line = "-" * (width + 2 + max(len(value) for _, value in rows))
    print(f"\nAS-Softmax run summary ({title})\n{line}")
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
