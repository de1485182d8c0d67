"""``LossAccuracyCorrelation``: does the validation loss track validation accuracy across runs?"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.functional.regression import pearson_corrcoef, spearman_corrcoef

from lightning_assoftmax.functional._checks import check_flag

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LossAccuracyCorrelation"]

_METHODS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "pearson": pearson_corrcoef,
    "spearman": spearman_corrcoef,
}
_DEFAULT_KEYS = {"loss": "val/loss", "ce_loss": "val/ce_loss", "acc": "val/acc"}
_DEFAULT_LABELS = {"loss": "loss", "ce_loss": "CE loss", "acc": "accuracy"}


class LossAccuracyCorrelation(Callback):
    r"""Correlates validation loss with validation accuracy across the validation runs of a fit.

    The AS-Softmax paper's second claim (Lv et al., 2025): the AS-Softmax validation loss tracks
    validation accuracy (SST-5: Pearson :math:`-0.95`), while plain cross entropy does not
    (:math:`+0.04`). This callback collects that evidence on any run. After every validation run
    of ``Trainer.fit`` (the sanity check excluded) it records the epoch values of ``loss_key``,
    ``ce_loss_key`` and ``acc_key`` from ``trainer.callback_metrics`` (the keys
    :class:`~lightning_assoftmax.ASSoftmaxMixin` logs by default), and once ``min_points`` runs
    are recorded it computes, over the whole history,

    .. math:: r = \frac{\sum_i (\ell_i - \bar\ell)(a_i - \bar a)}
                       {\sqrt{\sum_i (\ell_i - \bar\ell)^2 \sum_i (a_i - \bar a)^2}}

    (Pearson, with torchmetrics; Spearman is the same on ranks) for each loss against accuracy.
    A loss that tracks accuracy gives :math:`r` near :math:`-1`.

    Logged names append ``_<last part of acc_key>_<method>`` to each loss key; with the defaults:
    ``val/loss_acc_pearson``, ``val/ce_loss_acc_pearson``, ``val/loss_acc_spearman``,
    ``val/ce_loss_acc_spearman``. They go to every attached logger at the step of the validation
    values, and into ``trainer.callback_metrics`` from the first validation run of the fit on, NaN
    while undefined (fewer than ``min_points`` runs, a constant or non-finite series; loggers get
    no value then), so that ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them:

    * ``ModelCheckpoint(monitor="val/loss_acc_pearson", mode="min")`` works as is: Lightning ranks
      a NaN score last, so the first defined correlation replaces a checkpoint saved before it.
    * ``EarlyStopping(monitor="val/loss_acc_pearson", mode="min", check_finite=False,
      patience=p)`` with ``p >= min_points``, listed after this callback: ``check_finite=True``
      would stop at the first (NaN) run, and each NaN run counts as one without improvement.
      Other settings are refused when the fit starts, with the fix in the message.

    The keys are checked at the end of the sanity check (or of the first validation run without
    one): a module that does not log them fails there, with the names it does log.

    At the end of training it logs one comparison sentence (``compare()``), e.g.
    ``validation as_softmax(delta=0.1) loss vs accuracy: Pearson -0.95, Spearman -0.93; CE loss vs
    accuracy: Pearson -0.12, Spearman -0.10 (8 validation runs)`` (the loss is named by the
    module's ``as_softmax_loss_description`` when it has one), and writes a PNG into
    ``trainer.log_dir`` (``default_root_dir`` without a logger): the three series per validation
    run, and loss against accuracy with the correlations in the legend. An attached
    ``TensorBoardLogger`` receives the same figure. The figure needs matplotlib
    (``pip install lightning-assoftmax[plot]``); without it the figure is skipped with one info line.

    Only validation runs inside ``Trainer.fit`` count (a separate ``trainer.validate()`` does not).
    The history covers one ``fit`` call; it is saved in checkpoints, so a resumed fit continues it.
    Under DDP every rank holds rank 0's record of each run (the mixin's epoch values are already
    reduced over ranks) and computes the same correlations.

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[LossAccuracyCorrelation()])
        trainer.fit(model)  # a module using ASSoftmaxMixin.as_softmax_loss in validation_step

    Args:
        loss_key: logged epoch value of the validation loss (the AS-Softmax loss).
        ce_loss_key: logged plain cross entropy on the same logits; ``None`` to track only
            ``loss_key``.
        acc_key: logged validation accuracy.
        min_points: validation runs needed before correlations are computed and logged (>= 2;
            with 2 points any correlation is +-1).
        save_figure: write the figure at the end of training.
        figure_filename: file name inside the log directory (an absolute path is used as is).

    Attributes:
        figure_path: where the figure was written, ``None`` when it was not.
    """

    def __init__(
        self,
        loss_key: str = "val/loss",
        ce_loss_key: str | None = "val/ce_loss",
        acc_key: str = "val/acc",
        *,
        min_points: int = 3,
        save_figure: bool = True,
        figure_filename: str = "loss_accuracy_correlation.png",
    ) -> None:
        for name, key in (("loss_key", loss_key), ("acc_key", acc_key), ("ce_loss_key", ce_loss_key)):
            if key is None and name == "ce_loss_key":
                continue
            if not isinstance(key, str) or not key:
                raise TypeError(f"{name} must be a non-empty metric name such as 'val/loss', got {key!r}.")
        if isinstance(min_points, bool) or not isinstance(min_points, int) or min_points < 2:
            raise ValueError(
                f"min_points must be an integer >= 2 (a correlation needs at least two points), "
                f"got {min_points!r}; the default is 3."
            )
        if not isinstance(figure_filename, str) or not figure_filename:
            raise TypeError(f"figure_filename must be a non-empty file name, got {figure_filename!r}.")
        self.keys: dict[str, str] = {"loss": loss_key, "acc": acc_key}
        if ce_loss_key is not None:
            self.keys["ce_loss"] = ce_loss_key
        self.min_points = min_points
        self.save_figure = check_flag(
            "save_figure", save_figure, " Use save_figure=False to skip the figure at the end of training."
        )
        self.figure_filename = figure_filename
        self.figure_path: str | None = None
        self.loss_description: str | None = None
        self._history: list[dict[str, float | int]] = []
        self._correlations: dict[str, float] = {}

    # -- public API -------------------------------------------------------------------------
    @property
    def losses(self) -> tuple[str, ...]:
        """The tracked loss series, as history fields: ``("loss", "ce_loss")`` or ``("loss",)``."""
        return tuple(role for role in ("loss", "ce_loss") if role in self.keys)

    @property
    def history(self) -> list[dict[str, float | int]]:
        """One dict per recorded validation run: ``epoch``, ``step`` (global step), ``loss``,
        ``acc`` and, when tracked, ``ce_loss`` (floats, the logged epoch values)."""
        return [dict(record) for record in self._history]

    @property
    def correlations(self) -> dict[str, float]:
        """The latest correlations by logged name (NaN where undefined); empty before
        ``min_points`` runs."""
        return dict(self._correlations)

    def metric_name(self, loss: str, method: str) -> str:
        """Logged name of the ``method`` (``pearson``/``spearman``) correlation of a loss series."""
        return f"{self.keys[loss]}_{self.keys['acc'].rsplit('/', 1)[-1]}_{method}"

    def compare(self) -> str:
        """One sentence comparing how well each loss tracked accuracy over the recorded runs."""
        runs = len(self._history)
        plural = "run" if runs == 1 else "runs"
        if runs < self.min_points:
            return (
                f"validation loss vs accuracy: {runs} validation {plural} recorded, at least "
                f"{self.min_points} needed for a correlation"
            )
        parts = []
        for loss in self.losses:
            values = ", ".join(
                f"{method.capitalize()} {_format(self._correlations[self.metric_name(loss, method)])}"
                for method in _METHODS
            )
            parts.append(f"{self._label(loss)} vs {self._label('acc')}: {values}")
        return f"validation {'; '.join(parts)} ({runs} validation {plural})"

    # -- Lightning hooks --------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.keys)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # setup runs before a checkpoint is restored, so a resumed history survives this reset.
        if stage == TrainerFn.FITTING:
            self._history = []
            self._correlations = {}
            self.figure_path = None
        # The module's loss names the series ("label_smoothing loss"), so that runs with different
        # losses can be told apart in the log line and the figure.
        description = getattr(pl_module, "as_softmax_loss_description", None)
        self.loss_description = description if isinstance(description, str) else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup (EarlyStopping decides there when it checks), before the
        # sanity check: a misconfigured monitor fails before any work is done.
        self._check_monitors(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: the module's own on_validation_epoch_end runs after the
        # callbacks' and may log the very values read here. Lightning forbids self.log in this
        # hook, so the results are written to callback_metrics and the loggers directly.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:
            self._check_keys(trainer)  # fail now, not after the first training epoch
            return
        record = self._read_record(trainer)
        # Identical history on every rank even for values logged without sync_dist.
        record = trainer.strategy.broadcast(record, src=0)
        self._history.append(record)
        names = [self.metric_name(loss, method) for loss in self.losses for method in _METHODS]
        if len(self._history) < self.min_points:
            computed: dict[str, Tensor | None] = dict.fromkeys(names)
        else:
            computed = self._compute(pl_module.device)
            self._correlations = {
                name: float("nan") if value is None else float(value) for name, value in computed.items()
            }
        # Undefined is NaN (never an earlier value): monitors always find the key, and
        # ModelCheckpoint ranks NaN last. Loggers get defined values only.
        nan = torch.tensor(float("nan"), device=pl_module.device)
        trainer.callback_metrics.update(
            {name: nan if value is None else value.float() for name, value in computed.items()}
        )
        logged = {name: value.float() for name, value in computed.items() if value is not None}
        if not logged:
            return
        trainer.logged_metrics.update(logged)
        scalars = {name: float(value) for name, value in logged.items()}
        # As Lightning does for self.log values: a metrics.csv row then carries its epoch.
        scalars["epoch"] = float(trainer.current_epoch)
        # The step Lightning logs validation values at (one behind global_step at an epoch's end),
        # so the correlations line up with val/loss in the loggers' plots.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(self.compare())
        if not self.save_figure:
            return
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if trainer.is_global_zero:
            self._write_figure(trainer, log_dir or trainer.default_root_dir)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = [dict(record) for record in state_dict["history"]]
        # What the uninterrupted run holds at this point, also when no validation run follows
        # the resume (on_train_end reports them).
        self._correlations = {}
        if len(self._history) >= self.min_points:
            self._correlations = {
                name: float("nan") if value is None else float(value)
                for name, value in self._compute(torch.device("cpu")).items()
            }

    # -- internals --------------------------------------------------------------------------
    def _label(self, role: str) -> str:
        key = self.keys[role]
        if key != _DEFAULT_KEYS[role]:
            return key
        if role == "loss" and self.loss_description:
            return f"{self.loss_description} loss"
        return _DEFAULT_LABELS[role]

    def _check_monitors(self, trainer: pl.Trainer) -> None:
        names = {self.metric_name(loss, method) for loss in self.losses for method in _METHODS}
        own = trainer.callbacks.index(self) if self in trainer.callbacks else -1
        for index, callback in enumerate(trainer.callbacks):
            if not isinstance(callback, EarlyStopping) or callback.monitor not in names:
                continue
            call = f"EarlyStopping(monitor={callback.monitor!r})"
            # EarlyStopping checks either at the end of the training epoch (after validation: any
            # order works) or at the end of validation, where it must come after this callback.
            if index < own and getattr(callback, "_check_on_train_epoch_end", None) is not True:
                raise ValueError(
                    f"{call} is listed before LossAccuracyCorrelation in Trainer(callbacks=[...]), so it "
                    "would read the correlation before this callback computes it at the end of the "
                    "validation run. List LossAccuracyCorrelation before EarlyStopping."
                )
            if callback.check_finite:
                raise ValueError(
                    f"{call} would stop training at the first validation run: the correlation is NaN "
                    f"(undefined) until min_points={self.min_points} validation runs are recorded. "
                    "Pass EarlyStopping(..., check_finite=False)."
                )
            if callback.patience < self.min_points:
                raise ValueError(
                    f"{call} with patience={callback.patience} would stop training before the "
                    f"correlation exists: its first {self.min_points - 1} validation runs give NaN, which "
                    f"EarlyStopping counts as no improvement. Use patience >= {self.min_points}, or "
                    "LossAccuracyCorrelation(min_points=...) no larger than the patience."
                )

    def _check_keys(self, trainer: pl.Trainer) -> None:
        metrics = trainer.callback_metrics
        missing = [self.keys[role] for role in ("loss", "ce_loss", "acc") if role in self.keys and self.keys[role] not in metrics]
        if not missing:
            return
        logged = sorted(name for name in metrics if not name.startswith("train"))
        hint = ""
        suffixed = [name for name in logged if "/dataloader_idx_" in name]
        if suffixed:
            hint = (
                " With several validation dataloaders Lightning appends /dataloader_idx_<n> to each name: "
                "pick one, e.g. loss_key='val/loss/dataloader_idx_0'."
            )
        raise RuntimeError(
            f"LossAccuracyCorrelation reads {', '.join(repr(key) for key in missing)} at the end of every "
            f"validation run, but the module logged {logged} there. Log them in validation_step: "
            "ASSoftmaxMixin.as_softmax_loss(logits, target) logs val/loss, val/ce_loss and val/acc; or pass "
            "the names your module logs: LossAccuracyCorrelation(loss_key=..., ce_loss_key=... or None, "
            f"acc_key=...).{hint}"
        )

    def _read_record(self, trainer: pl.Trainer) -> dict[str, float | int]:
        self._check_keys(trainer)
        metrics = trainer.callback_metrics
        record: dict[str, float | int] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        record.update({role: float(metrics[key]) for role, key in self.keys.items()})
        return record

    def _compute(self, device: torch.device) -> dict[str, Tensor | None]:
        # Functional torchmetrics over the whole history: every rank already holds all of it, so a
        # Metric object's cross-rank sync would only repeat it world_size times.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        acc = torch.tensor([r["acc"] for r in self._history], dtype=dtype, device=device)
        results: dict[str, Tensor | None] = {}
        for loss in self.losses:
            values = torch.tensor([r[loss] for r in self._history], dtype=dtype, device=device)
            for method, function in _METHODS.items():
                results[self.metric_name(loss, method)] = _correlation(function, values, acc)
        return results

    def _write_figure(self, trainer: pl.Trainer, log_dir: str) -> None:
        if not self._history:
            rank_zero_info("LossAccuracyCorrelation: no validation run was recorded, no figure written.")
            return
        try:
            from matplotlib.figure import Figure
        except ImportError:
            rank_zero_info(
                "LossAccuracyCorrelation: matplotlib is not installed, skipping the figure "
                "(pip install 'lightning-assoftmax[plot]')."
            )
            return
        figure = self._draw(Figure)
        path = os.path.join(log_dir, self.figure_filename)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        figure.savefig(path, format="png", dpi=100)
        self.figure_path = path
        rank_zero_info(f"LossAccuracyCorrelation: figure written to {path}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    "val/loss_accuracy_correlation", figure, global_step=trainer.global_step, close=False
                )

    def _draw(self, figure_class: type[Figure]) -> Figure:
        runs = list(range(1, len(self._history) + 1))
        acc = [r["acc"] for r in self._history]
        figure = figure_class(figsize=(11, 4.2))
        curves, scatter = figure.subplots(1, 2)

        lines = []
        for loss, style in zip(self.losses, ("o-", "s--"), strict=False):
            lines += curves.plot(runs, [r[loss] for r in self._history], style, label=self._label(loss))
        curves.set_xlabel("validation run")
        curves.set_ylabel("loss")
        accuracy_axis = curves.twinx()
        lines += accuracy_axis.plot(runs, acc, "^:", color="tab:green", label=self._label("acc"))
        accuracy_axis.set_ylabel(self._label("acc"))
        curves.xaxis.get_major_locator().set_params(integer=True)
        curves.legend(
            lines, [line.get_label() for line in lines], loc="upper center",
            bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False,
        )
        curves.set_title("per validation run")

        for loss, marker in zip(self.losses, ("o", "s"), strict=False):
            stats = ", ".join(
                f"{method.capitalize()} "
                f"{_format(self._correlations.get(self.metric_name(loss, method), math.nan))}"
                for method in _METHODS
            )
            scatter.scatter(
                [r[loss] for r in self._history], acc, marker=marker, label=f"{self._label(loss)} ({stats})"
            )
        scatter.set_xlabel("loss")
        scatter.set_ylabel(self._label("acc"))
        scatter.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
        scatter.set_title("loss vs accuracy across validation runs")
        trained = f", trained with {self.loss_description}" if self.loss_description else ""
        figure.suptitle(f"Validation loss vs accuracy ({len(runs)} validation runs{trained})")
        figure.tight_layout()
        return figure


def _correlation(function: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor | None:
    """``function(x, y)``, or ``None`` where the correlation is undefined (constant or non-finite)."""
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return None
    if x.max() == x.min() or y.max() == y.min():
        return None
    # Nearly constant series: torchmetrics warns and returns NaN; one NaN is enough, not a warning
    # per validation run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The variance of predictions or target is close to zero")
        value = function(x, y)
    return value if bool(torch.isfinite(value)) else None


def _format(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:+.2f}"
