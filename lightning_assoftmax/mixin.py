"""``ASSoftmaxMixin``: the AS-Softmax loss (or another softmax-family loss) and its metrics
inside any ``LightningModule``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from lightning_assoftmax.family import (
    build_loss,
    check_loss_name,
    count_class_labels,
    loss_kwarg_names,
)
from lightning_assoftmax.functional import multilabel_as_softmax_loss
from lightning_assoftmax.functional._checks import check_delta, check_flag, check_ignore_index
from lightning_assoftmax.functional.linear import linear_as_softmax_loss_and_flags
from lightning_assoftmax.functional.multi_label import multilabel_as_softmax_loss_and_flags
from lightning_assoftmax.metrics import MaskedSampleRatio, WeightedMean
from lightning_assoftmax.ops import compute_dtype

__all__ = ["ASSoftmaxMixin"]

# Multi-label targets only have the AS-Softmax loss and its delta=1 base loss.
MULTILABEL_LOSSES = ("as_softmax", "softmax")


def _label_of(item: Any) -> Any:
    """The label of one dataset item: ``item["labels"]`` (or ``"label"``), else its last element."""
    if isinstance(item, Mapping):
        for key in ("labels", "label"):
            if key in item:
                return item[key]
        raise ValueError(
            f"cannot find the label of a training item with keys {sorted(item)}; give the datamodule "
            "a `class_counts` attribute for weighted_softmax(weight='balanced')."
        )
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[-1]
    raise ValueError(
        f"cannot find the label of a training item of type {type(item).__name__}; give the datamodule "
        "a `class_counts` attribute for weighted_softmax(weight='balanced')."
    )


def _stage_keys(stage: str, masked_ratio: bool) -> tuple[str, ...]:
    keys = ("loss", "masked_ratio") if masked_ratio else ("loss",)
    return keys if stage == "train" else keys + ("ce_loss", "acc")


class OutputLayer(Protocol):
    """What :meth:`ASSoftmaxMixin.as_softmax_head_loss` needs of an output layer (the heads of
    :mod:`lightning_assoftmax.heads` have it). A ``mean_weight(target, *, ignore_index)`` method,
    if present, gives what its ``"mean"`` divides by (else the non-ignored count)."""

    def loss_and_stats(
        self, hidden: Tensor, target: Tensor, *, delta: float | None, ignore_index: int
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def log_prob(self, hidden: Tensor) -> Tensor: ...


class ASSoftmaxMixin:
    """Adds ``as_softmax_loss(logits, target)`` and its logging to a ``LightningModule``.

    List the mixin *before* ``LightningModule`` and pass ``delta`` through ``super().__init__``::

        class MyModel(ASSoftmaxMixin, L.LightningModule):
            def __init__(self, hidden: int = 64, delta: float = 0.1):
                super().__init__(delta=delta)
                self.save_hyperparameters()
                ...

            def training_step(self, batch, batch_idx):
                x, y = batch
                return self.as_softmax_loss(self(x), y)

    In a running ``Trainer`` the method logs ``<stage>/loss`` and ``<stage>/masked_ratio`` for
    ``train`` (per step and per epoch), ``val`` and ``test`` (per epoch), plus ``<stage>/ce_loss``
    (plain cross entropy on the same logits) and ``<stage>/acc`` in validation and test. Epoch
    values are exact over all non-ignored samples of all processes (torchmetrics states: the loss
    means in :class:`~lightning_assoftmax.metrics.WeightedMean`, the masked ratio in
    :class:`~lightning_assoftmax.MaskedSampleRatio` fed with the loss call's own counts, accuracy
    in torchmetrics' ``MulticlassAccuracy`` / ``MultilabelAccuracy`` with ``average="micro"``).
    With several validation or test dataloaders each dataloader has its own metrics, logged under
    Lightning's ``/dataloader_idx_<n>`` suffix (``val/acc/dataloader_idx_1``). The logging around
    the loss reads no tensor value on the host (no per-batch synchronisation on a GPU).

    Call it once per batch with ``log=True`` (the default); further calls in the same step (a
    second head, an auxiliary loss) take ``log=False``, or their batch is counted again.

    Another member of the softmax family (see :func:`~lightning_assoftmax.build_loss`) replaces
    AS-Softmax with ``loss="sparsemax"`` (and its keywords in ``loss_kwargs``); the method keeps
    its name and logs the same keys, except that ``<stage>/masked_ratio`` (share of samples whose
    loss is exactly zero) is logged only for losses that can zero a sample out (``as_softmax``,
    ``sparsemax``, ``entmax15``, ``sparse_softmax`` with ``k=1``, and the large-margin losses when
    ``loss_kwargs`` sets their ``delta``). ``<stage>/ce_loss`` is the plain cross entropy of the
    loss's ``predictive_logits``, the model's margin-free distribution (the raw logits,
    ``logits / temperature`` for ``t_softmax``, ``scale * cosines`` for the cosine-margin losses,
    ``alpha * logits`` for ``l2_softmax``). Give the model the output layer its loss needs:
    ``classifier_head(in_features, num_classes, loss=name)``.

    ``weighted_softmax`` with ``weight="balanced"`` counts the training labels the first time the
    loss is computed in a ``Trainer``: from the datamodule's ``class_counts`` attribute (one count
    per class) when it has one, else in one pass over the training dataset (items that are dicts
    with ``"labels"`` or ``"label"``, or ``(inputs, ..., label)`` tuples).

    A model whose output layer owns the class weights (a head of :mod:`lightning_assoftmax.heads`,
    e.g. adaptive softmax) calls ``as_softmax_head_loss(head, hidden, target)`` instead: the head
    computes the loss from the hidden states (with ``delta`` for ``loss="as_softmax"``, its own loss
    for ``loss="softmax"``), and ``ce_loss`` and ``acc`` come from its exact distribution; the keys
    are the same.

    Args:
        delta: the AS-Softmax margin in ``[0, 1]`` (paper: 0.1; 1 is plain cross entropy); used
            by ``loss="as_softmax"`` only (a large-margin loss takes its own ``delta`` in
            ``loss_kwargs``).
        multilabel: targets are 0/1 tensors shaped like the logits (multi-label AS-Softmax); the
            logged ``acc`` is then label-wise accuracy at the score threshold 0 and ``ce_loss``
            the unmasked multi-label base loss. Only ``as_softmax`` and ``softmax`` (its
            ``delta=1`` base loss) exist for multi-label targets.
        ignore_index: target value to skip (single-label only).
        loss: name of the loss: as_softmax, softmax, t_softmax, sparse_softmax, sparsemax,
            entmax15, label_smoothing, am_softmax, l_softmax, sphereface, l2_softmax, normface,
            cosface, arcface or weighted_softmax (``lightning_assoftmax.family.LOSS_NAMES``).
        loss_kwargs: keywords of that loss (e.g. ``{"k": 3}`` for ``sparse_softmax``,
            ``{"margin": 0.5, "delta": 0.1}`` for ``arcface`` composed with AS-Softmax); not
            ``ignore_index`` or ``reduction`` (the mixin sets them), nor, for ``as_softmax``,
            ``delta`` (an argument of the mixin's own).

    Attributes:
        as_softmax_delta: the delta used for the *training* loss; ``DeltaWarmup`` moves it.
        as_softmax_target_delta: the configured delta, used for validation and test losses so
            that their values stay comparable across epochs.
        as_softmax_last_stats: ``(masked_count, valid_count)`` of the latest training batch
            (0-dim integer tensors) from its ``log=True`` call(s), read by
            ``AdaptiveGradAccumulation``. ``masked_count`` counts masked samples (AS-Softmax's
            keep rule kept only the target; their loss is exactly zero), and is 0 for losses that
            cannot zero a sample out, so that accumulation stays at one batch per step for them.
        as_softmax_track_masked_samples: when true (``SkipMaskedSamples`` sets it for the fit),
            training calls also record ``as_softmax_last_masked_samples``.
        as_softmax_last_masked_samples: bool ``(N,)`` on the logits' device, one flag per sample
            of the latest training batch: every non-ignored position of it is a masked sample
            (a sample whose positions are all ignored counts as masked: it has no gradient
            either); all false for losses that cannot zero a sample out. Several calls in one
            step are combined with a logical and, if the holder resets it to ``None`` between
            steps (``SkipMaskedSamples`` does).
        as_softmax_criterion: the loss module (``None`` for multi-label targets).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        modules = [i for i, base in enumerate(mro) if base is nn.Module]
        if modules and mro.index(ASSoftmaxMixin) > modules[0]:
            raise TypeError(
                f"{cls.__name__}: list ASSoftmaxMixin before LightningModule in the base classes, "
                f"e.g. `class {cls.__name__}(ASSoftmaxMixin, L.LightningModule)`, so that its "
                "keyword arguments (delta, ...) are consumed before nn.Module.__init__."
            )

    def __init__(
        self,
        *args: Any,
        delta: float = 0.1,
        multilabel: bool = False,
        ignore_index: int = -100,
        loss: str = "as_softmax",
        loss_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.as_softmax_target_delta = check_delta(delta)
        self.as_softmax_delta = self.as_softmax_target_delta
        self.as_softmax_multilabel = check_flag(
            "multilabel",
            multilabel,
            " Use multilabel=True for 0/1 targets shaped like the logits, False (the default) for "
            "class indices.",
        )
        self.as_softmax_ignore_index = check_ignore_index(ignore_index)
        self.as_softmax_loss_name = check_loss_name(loss)
        self.as_softmax_loss_kwargs = dict(loss_kwargs) if isinstance(loss_kwargs, Mapping) else {}
        self.as_softmax_criterion = self._as_softmax_build_criterion(loss, loss_kwargs)
        if self.as_softmax_criterion is None:
            self.as_softmax_reports_masked = loss == "as_softmax"
        else:
            self.as_softmax_reports_masked = bool(self.as_softmax_criterion.produces_masked_samples)
        self.as_softmax_last_stats: tuple[Tensor, Tensor] | None = None
        # One set of metrics per stage and dataloader, made at its first batch: the number of
        # classes (for accuracy) and of evaluation dataloaders are known only then.
        self.as_softmax_metrics = nn.ModuleDict()
        self._as_softmax_logged_batch: tuple | None = None
        self._as_softmax_warned_twice = False
        self.as_softmax_track_masked_samples = False
        self.as_softmax_last_masked_samples: Tensor | None = None

    # -- public API -------------------------------------------------------------------------
    @property
    def as_softmax_loss_description(self) -> str:
        """The loss and its key settings, e.g. ``as_softmax(delta=0.1)`` or
        ``label_smoothing(smoothing=0.2)``: ``delta`` for AS-Softmax, else the ``loss_kwargs``
        given (a loss's own defaults are not repeated). Names runs in summaries, logs and figures."""
        settings: dict[str, Any] = {}
        if self.as_softmax_loss_name == "as_softmax":
            settings["delta"] = self.as_softmax_target_delta
        settings.update(self.as_softmax_loss_kwargs)
        listed = ", ".join(f"{key}={value}" for key, value in settings.items())
        return f"{self.as_softmax_loss_name}({listed})" if listed else self.as_softmax_loss_name

    def as_softmax_loss(self, logits: Tensor, target: Tensor, *, log: bool = True) -> Tensor:
        """The (mean) loss of a batch (AS-Softmax unless ``loss=`` chose another); logs it when
        called inside a ``Trainer`` loop.

        Shapes as ``F.cross_entropy``: logits ``(N, C)`` or ``(N, C, d1, ...)``, target ``(N)`` or
        ``(N, d1, ...)``; for ``multilabel=True`` the target is 0/1 shaped like the logits.

        Args:
            log: update and log the stage's metrics with this call and, in training, hand its
                masked and valid counts to ``AdaptiveGradAccumulation`` (``as_softmax_last_stats``).
                Pass ``False`` for every further call in the same step (a second head, an
                auxiliary loss), so that each batch is logged and counted once.
        """
        if not isinstance(log, bool):
            raise TypeError(
                f"as_softmax_loss: log must be True or False, got {log!r}; use log=False for the "
                "calls (second head, auxiliary loss) that should not be logged."
            )
        stage = self._as_softmax_stage()
        delta = self.as_softmax_delta if stage in (None, "train") else self.as_softmax_target_delta
        criterion = self.as_softmax_criterion
        if criterion is None:
            if self.as_softmax_loss_name != "as_softmax":
                delta = 1.0
            loss, flags, count = multilabel_as_softmax_loss_and_flags(logits, target, delta)
            ignored = None
        else:
            if self.as_softmax_loss_name == "as_softmax":
                criterion.delta = delta  # DeltaWarmup moves the training delta between batches
            if getattr(criterion, "needs_class_counts", False) and stage is not None:
                num_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
                criterion.set_class_counts(self._as_softmax_training_class_counts(num_classes))
            loss, flags, count = criterion.loss_and_flags(logits, target)
            ignored = target == self.as_softmax_ignore_index
        masked = self._as_softmax_masked_count(flags)
        if stage == "train" and self.as_softmax_track_masked_samples:
            self._as_softmax_record_masked_samples(flags, ignored)
        if log and stage is not None:
            self._as_softmax_log(stage, loss, masked, count, logits, target)
        return loss

    def as_softmax_linear_loss(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *, log: bool = True
    ) -> Tensor:
        """:meth:`as_softmax_loss` of the output layer ``F.linear(hidden, weight, bias)``, for many
        classes: hidden states ``(..., H)``, ``weight`` ``(C, H)`` (an ``nn.Linear``'s), targets
        ``(...)``.

        In training with ``loss="as_softmax"`` or ``"softmax"`` (single-label) the logits are never
        formed for the whole batch: :func:`~lightning_assoftmax.functional.linear_as_softmax_loss_and_stats`
        works in row chunks, so the ``(..., C)`` logits and their gradient are not held in memory
        (``softmax`` is AS-Softmax with ``delta=1``, the cross entropy). Validation and test form the
        logits (without a graph) for ``ce_loss`` and ``acc``, as do the other losses. Logs the same
        keys; ``log`` as for :meth:`as_softmax_loss`.
        """
        if not isinstance(log, bool):
            raise TypeError(f"as_softmax_linear_loss: log must be True or False, got {log!r}.")
        stage = self._as_softmax_stage()
        fused = (
            stage in (None, "train")
            and not self.as_softmax_multilabel
            and self.as_softmax_loss_name in ("as_softmax", "softmax")
        )
        if not fused:
            logits = F.linear(hidden, weight, bias)
            if logits.dim() > 2:
                logits = logits.movedim(-1, 1)  # (N, ..., C) -> (N, C, ...), as F.cross_entropy
            return self.as_softmax_loss(logits, target, log=log)
        delta = self.as_softmax_delta if self.as_softmax_loss_name == "as_softmax" else 1.0
        loss, flags, count = linear_as_softmax_loss_and_flags(
            hidden, weight, target, bias, delta, ignore_index=self.as_softmax_ignore_index
        )
        masked = self._as_softmax_masked_count(flags)
        if stage == "train" and self.as_softmax_track_masked_samples:
            self._as_softmax_record_masked_samples(flags, target == self.as_softmax_ignore_index)
        if log and stage is not None:
            self._as_softmax_log(stage, loss, masked, count, None, target)
        return loss

    def as_softmax_head_loss(self, head: OutputLayer, hidden: Tensor, target: Tensor, *, log: bool = True) -> Tensor:
        """:meth:`as_softmax_loss` for an output layer that owns the class weights (see
        :func:`lightning_assoftmax.heads.build_head`): the loss of hidden states ``(..., H)`` with
        targets ``(...)``, logged under the same keys.

        With ``loss="as_softmax"`` the head gets the current ``delta``, with ``loss="softmax"`` none
        (its own training loss). ``<stage>/ce_loss`` and ``<stage>/acc`` come from the head's exact
        ``log_prob``, never from a training approximation; training computes no ``log_prob``.
        ``log`` as for :meth:`as_softmax_loss`.
        """
        if not isinstance(log, bool):
            raise TypeError(f"as_softmax_head_loss: log must be True or False, got {log!r}.")
        stage = self._as_softmax_stage()
        delta = None
        if self.as_softmax_loss_name == "as_softmax":
            delta = self.as_softmax_delta if stage in (None, "train") else self.as_softmax_target_delta
        criterion = getattr(head, "criterion", None)  # dense's softmax-family loss
        if getattr(criterion, "needs_class_counts", False) and stage is not None:
            criterion.set_class_counts(self._as_softmax_training_class_counts(head.num_classes))
        # A sampled head would draw other candidates in a second call: the flags come from this one.
        loss, flags, count = head.loss_and_flags(
            hidden, target, delta=delta, ignore_index=self.as_softmax_ignore_index
        )
        masked = self._as_softmax_masked_count(flags)
        if stage == "train" and self.as_softmax_track_masked_samples:
            self._as_softmax_record_masked_samples(flags, target == self.as_softmax_ignore_index)
        if log and stage is not None:
            log_p = None
            if stage != "train":
                with torch.no_grad():
                    log_p = head.log_prob(hidden.detach()).flatten(0, -2)  # (M, C): rows, classes
                target = target.reshape(-1)
            # What the head's mean divided by: a class-weighted loss divides by the targets' weights.
            mean_weight = getattr(head, "mean_weight", None)
            norm = None
            if mean_weight is not None:
                with torch.no_grad():
                    norm = mean_weight(target, ignore_index=self.as_softmax_ignore_index)
            self._as_softmax_log(stage, loss, masked, count, log_p, target, log_probs=True, loss_weight=norm)
        return loss

    # -- internals --------------------------------------------------------------------------
    def _as_softmax_build_criterion(self, loss: str, loss_kwargs: Mapping[str, Any] | None) -> nn.Module | None:
        if loss_kwargs is None:
            loss_kwargs = {}
        if not isinstance(loss_kwargs, Mapping):
            raise TypeError(
                f"loss_kwargs must be a mapping of keyword arguments for loss {loss!r} (e.g. "
                f"{{'k': 3}}) or None, got {loss_kwargs!r}."
            )
        # A large-margin loss's delta (AS-Softmax on its margin logits) is one of its keywords;
        # as_softmax's own delta is the mixin's, which DeltaWarmup moves.
        mixin_owned = ("ignore_index", "reduction", "delta") if loss == "as_softmax" else ("ignore_index", "reduction")
        own = [key for key in loss_kwargs if key in mixin_owned]
        if own:
            raise ValueError(
                f"loss_kwargs must not set {', '.join(own)}: pass ignore_index and delta to the "
                "mixin itself (ASSoftmaxMixin.__init__(..., ignore_index=..., delta=...)); the "
                "reduction is always the mean."
            )
        if self.as_softmax_multilabel:
            if loss not in MULTILABEL_LOSSES:
                raise ValueError(
                    f"loss={loss!r} has no multi-label form; with multilabel=True use one of "
                    f"{', '.join(MULTILABEL_LOSSES)} ('softmax' is the multi-label base loss, i.e. "
                    "AS-Softmax with delta=1)."
                )
            if loss_kwargs:
                raise ValueError(
                    f"loss_kwargs {dict(loss_kwargs)!r} given with multilabel=True; the multi-label "
                    "losses take no keywords (set delta on the mixin)."
                )
            return None
        own_kwargs: dict[str, Any] = {"ignore_index": self.as_softmax_ignore_index}
        if loss == "as_softmax":
            own_kwargs["delta"] = self.as_softmax_target_delta
        accepted = [k for k in loss_kwarg_names(loss) if k not in mixin_owned]
        unexpected = sorted(set(loss_kwargs) - set(accepted))
        if unexpected:
            raise TypeError(
                f"loss_kwargs for loss={loss!r} has unexpected key(s) {', '.join(unexpected)}; "
                f"{loss!r} accepts: {', '.join(accepted) if accepted else 'no keywords'}."
            )
        return build_loss(loss, **own_kwargs, **loss_kwargs)

    def _as_softmax_training_class_counts(self, num_classes: int) -> Tensor:
        """Per-class counts of the training labels, for ``weighted_softmax(weight="balanced")``:
        the datamodule's ``class_counts`` if it has one, else one pass over the training dataset."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None)
        counts = getattr(datamodule, "class_counts", None)
        if counts is not None:
            return torch.as_tensor(counts)
        if datamodule is not None and callable(getattr(datamodule, "train_dataloader", None)):
            loader = datamodule.train_dataloader()
        else:
            loader = getattr(trainer, "train_dataloader", None)
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError(
                "weighted_softmax(weight='balanced') needs the training split's class counts, but "
                "no training dataset is reachable from the Trainer here. Give the datamodule a "
                "`class_counts` attribute (one count per class), or pass loss_kwargs={'class_counts': "
                "[...]} or explicit weights (loss_kwargs={'weight': [...]})."
            )
        return count_class_labels(
            (_label_of(item) for item in dataset), num_classes, self.as_softmax_ignore_index
        )

    def _as_softmax_masked_count(self, flags: Tensor) -> Tensor:
        """The number of masked samples among a loss call's per-position flags (0 for a loss
        that does not report them)."""
        if not self.as_softmax_reports_masked:
            return torch.zeros((), dtype=torch.long, device=flags.device)
        return flags.sum()

    @torch.no_grad()
    def _as_softmax_record_masked_samples(self, flags: Tensor, ignored: Tensor | None) -> None:
        """Keep a training batch's per-sample flags (for ``SkipMaskedSamples``), on the device,
        from the masked flags of the loss call itself (the keep rule's, never a zero loss); a
        further loss call in the step ANDs its own in.

        ``flags`` are per position (shaped like the target, or one per row for multi-label
        targets) and false at ignored positions (``ignored``): a sample is masked when all its
        non-ignored positions are.
        """
        n = flags.shape[0] if flags.dim() else 1
        if not self.as_softmax_reports_masked:
            sample_flags = torch.zeros(n, dtype=torch.bool, device=flags.device)
        else:
            if ignored is not None:
                flags = flags | ignored.reshape(flags.shape)
            sample_flags = flags.reshape(n, -1).all(dim=1)
        previous = self.as_softmax_last_masked_samples
        if previous is not None and previous.shape == sample_flags.shape:
            sample_flags = previous & sample_flags
        self.as_softmax_last_masked_samples = sample_flags

    def _as_softmax_stage(self) -> str | None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return None
        if trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        if trainer.testing:
            return "test"
        return None

    @torch.no_grad()
    def _as_softmax_ce_sum(self, logits: Tensor, target: Tensor) -> Tensor:
        """Summed plain loss on the same logits (for ``ce_loss``)."""
        if self.as_softmax_multilabel:
            return multilabel_as_softmax_loss(logits, target, 1.0, reduction="sum")
        scores = self.as_softmax_criterion.predictive_logits(logits.to(compute_dtype(logits.dtype)))
        return F.cross_entropy(scores, target, ignore_index=self.as_softmax_ignore_index, reduction="sum")

    def _as_softmax_new_metric(self, key: str, logits: Tensor) -> Metric:
        if key == "masked_ratio":
            return MaskedSampleRatio()
        if key != "acc":
            return WeightedMean()
        classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
        # validate_args=False: the loss call has checked the targets already, and the checks
        # would read tensor values on the host at every batch.
        if self.as_softmax_multilabel:
            return MultilabelAccuracy(classes, average="micro", validate_args=False)
        return MulticlassAccuracy(
            classes, average="micro", ignore_index=self.as_softmax_ignore_index, validate_args=False
        )

    def _as_softmax_stage_metrics(self, stage: str, dataloader_idx: int | None, logits: Tensor) -> dict[str, str]:
        """Attribute names (in ``as_softmax_metrics``) of the metrics of a stage and dataloader."""
        prefix = stage if dataloader_idx is None else f"{stage}_dataloader_idx_{dataloader_idx}"
        names = {key: f"{prefix}_{key}" for key in _stage_keys(stage, self.as_softmax_reports_masked)}
        for key, name in names.items():
            if name not in self.as_softmax_metrics:
                self.as_softmax_metrics[name] = self._as_softmax_new_metric(key, logits).to(logits.device)
        return names

    def _as_softmax_batch(self, stage: str, dataloader_idx: int | None) -> tuple | None:
        """Identifies the running batch, to notice a second logging call within it."""
        trainer = self._trainer
        try:
            loop = trainer.fit_loop.epoch_loop if stage == "train" else trainer._evaluation_loop
            return id(trainer), stage, dataloader_idx, loop.batch_progress.total.ready
        except (AttributeError, RuntimeError):
            return None

    def _as_softmax_log(
        self,
        stage: str,
        loss: Tensor,
        masked: Tensor,
        count: Tensor,
        logits: Tensor | None,
        target: Tensor,
        *,
        log_probs: bool = False,
        loss_weight: Tensor | None = None,
    ) -> None:
        """Update and log the stage's metrics; ``logits`` may be ``None`` in training (unused
        there), ``log_probs`` says they are a head's normalised log-probabilities, and
        ``loss_weight`` is what the loss's mean divided by (default: the criterion's rule)."""
        results = getattr(self._trainer, "_results", None)
        # The index Lightning's self.log appends as /dataloader_idx_<n> (None with one dataloader).
        dataloader_idx = getattr(results, "dataloader_idx", None)
        batch = self._as_softmax_batch(stage, dataloader_idx)
        again = batch is not None and batch == self._as_softmax_logged_batch
        self._as_softmax_logged_batch = batch
        if again and not self._as_softmax_warned_twice:
            self._as_softmax_warned_twice = True
            rank_zero_warn(
                f"{type(self).__name__} called as_softmax_loss(..., log=True) more than once in one "
                f"{stage} step: the batch is logged once per call (and in training, "
                "AdaptiveGradAccumulation counts the samples of every such call). Pass log=False to "
                "the calls that should not be logged, e.g. an auxiliary head's loss."
            )
        if stage == "train":
            stats = self.as_softmax_last_stats
            if again and stats is not None:
                masked_total, count_total = stats[0] + masked, stats[1] + count
                self.as_softmax_last_stats = (masked_total, count_total)
            else:
                self.as_softmax_last_stats = (masked, count)
        names = self._as_softmax_stage_metrics(stage, dataloader_idx, loss if logits is None else logits)
        metrics = self.as_softmax_metrics
        on_step = stage == "train"
        # Tensors all the way: an all-ignored batch has count 0 and adds nothing (no Python test).
        # Batch means weighted by what each batch's mean divides by give the exact epoch mean
        # (the sum of the targets' class weights for weighted_softmax, the sample count otherwise).
        if loss_weight is None:
            mean_weight = getattr(self.as_softmax_criterion, "mean_weight", None)
            loss_weight = mean_weight(target) if mean_weight is not None else count
        updates: dict[str, tuple[tuple, dict]] = {"loss": ((loss.detach().float(), loss_weight), {})}
        if "masked_ratio" in names:
            updates["masked_ratio"] = ((), {"masked_count": masked, "valid_count": count})
        if stage != "train":
            logits, target = logits.detach(), target.detach()
            if log_probs:
                ce_sum = F.nll_loss(logits, target, ignore_index=self.as_softmax_ignore_index, reduction="sum")
            else:
                ce_sum = self._as_softmax_ce_sum(logits, target)
            ce = ce_sum.float() / count.clamp(min=1)
            updates["ce_loss"] = ((ce, count), {})
            if self.as_softmax_multilabel:
                updates["acc"] = (((logits > 0).long(), target.long()), {})
            elif logits.dim() == 1:
                updates["acc"] = ((logits.unsqueeze(0), target.reshape(1)), {})
            else:
                updates["acc"] = ((logits, target), {})
        for key, (args, kwargs) in updates.items():
            metric = metrics[names[key]]
            if on_step:
                metric(*args, **kwargs)  # forward: Lightning logs the batch value too
            else:
                metric.update(*args, **kwargs)
            self.log(
                f"{stage}/{key}",
                metric,
                on_step=on_step,
                on_epoch=True,
                prog_bar=key in ("loss", "acc", "masked_ratio"),
                metric_attribute=f"as_softmax_metrics.{names[key]}",
            )
