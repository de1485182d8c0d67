"""AS-Softmax for ``transformers.Trainer``: the loss, and the masked ratio in the Trainer's logs.

Two ways in, both on the logits of a sequence- or token-classification model:

* ``Trainer(..., compute_loss_func=ASSoftmaxLossFunc(delta=0.1))``: the loss only;
* ``ASSoftmaxTrainer(..., delta=0.1)``: the same loss, plus ``masked_ratio`` in every training
  log entry and ``<prefix>_masked_ratio`` (``eval_masked_ratio``) in the evaluation metrics, so
  they reach ``trainer.state.log_history`` and every reporting integration.

Needs ``transformers`` and ``accelerate`` (``pip install 'lightning-assoftmax[huggingface]'``); no
Lightning import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_assoftmax.losses import ASSoftmaxLoss

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lightning_assoftmax.huggingface needs the 'transformers' and 'accelerate' packages: "
        "`pip install 'lightning-assoftmax[huggingface]'`."
    ) from err

__all__ = ["ASSoftmaxLossFunc", "ASSoftmaxTrainer"]

#: The label value ``transformers.Trainer`` leaves out of ``num_items_in_batch``.
HF_IGNORE_INDEX = -100


class ASSoftmaxLossFunc:
    """AS-Softmax loss in the form ``transformers.Trainer(compute_loss_func=...)`` calls it.

    ``loss_func(outputs, labels, num_items_in_batch=None)`` takes the model's ``logits`` —
    ``(N, C)`` for sequence classification, ``(N, L, C)`` for token classification — and integer
    ``labels`` ``(N)`` / ``(N, L)`` with ``ignore_index`` for padding. It returns the loss summed
    over the non-ignored labels and divided by ``num_items_in_batch`` (the Trainer's count of such
    labels over all micro-batches of a gradient-accumulation step, and over all processes with
    ``average_tokens_across_devices``), or their mean when that count is not given. The Trainer
    treats the loss of any ``compute_loss_func`` as already scaled for gradient accumulation.

    The masked and valid counts of every call are added to :attr:`counts` (tensors on the logits'
    device; nothing is read on the host), which :class:`ASSoftmaxTrainer` turns into the logged
    masked ratio.

    Args:
        delta: the AS-Softmax margin in ``[0, 1]`` (paper: 0.1; 1 is plain cross entropy).
        ignore_index: label value to skip. Only Hugging Face's -100: ``transformers.Trainer``
            counts ``num_items_in_batch`` as the labels that are not -100, so any other value
            would leave the skipped labels in the divisor. For another padding label use
            :class:`ASSoftmaxTrainer`, which counts ``labels != ignore_index`` itself.

    Example::

        trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                       compute_loss_func=ASSoftmaxLossFunc(delta=0.1))
    """

    def __init__(self, delta: float = 0.1, ignore_index: int = -100) -> None:
        self._check_ignore_index(ignore_index)
        self.criterion = ASSoftmaxLoss(delta, ignore_index=ignore_index, reduction="sum")
        self.counts: tuple[Tensor, Tensor] | None = None

    def _check_ignore_index(self, ignore_index: int) -> None:
        if ignore_index != HF_IGNORE_INDEX:
            raise ValueError(
                f"ASSoftmaxLossFunc(ignore_index={ignore_index!r}): transformers.Trainer divides the loss by "
                "num_items_in_batch, its count of the labels that are not -100, so labels equal to "
                f"{ignore_index!r} would be skipped by the loss but counted in the mean. Use "
                f"ASSoftmaxTrainer(..., ignore_index={ignore_index!r}), which counts the labels that are "
                f"not {ignore_index!r}, or set the ignored labels to -100 and keep the default ignore_index."
            )

    @property
    def delta(self) -> float:
        return self.criterion.delta

    def __call__(self, outputs: Any, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if labels is None:
            raise ValueError(
                "ASSoftmaxLossFunc got labels=None: the batches must carry a 'labels' field (class "
                "indices, -100 where ignored)."
            )
        if logits.dim() == labels.dim() + 1 and logits.dim() > 2:
            logits = logits.movedim(-1, 1)  # (N, L, C) -> (N, C, L), the class dimension second
        elif logits.dim() != labels.dim() + 1:
            raise ValueError(
                f"ASSoftmaxLossFunc takes logits (N, C) with labels (N) or logits (N, L, C) with labels "
                f"(N, L), got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
            )
        total, masked, valid = self.criterion.loss_and_stats(logits, labels)
        self.add_counts(masked, valid)
        if num_items_in_batch is None:
            return total / valid.clamp(min=1)
        return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)

    def add_counts(self, masked: Tensor, valid: Tensor) -> None:
        if self.counts is None:
            self.counts = (masked, valid)
        else:
            self.counts = (self.counts[0] + masked, self.counts[1] + valid)

    def pop_counts(self) -> tuple[Tensor, Tensor] | None:
        """The counts gathered since the last pop (``None`` if there were no calls), and reset."""
        counts, self.counts = self.counts, None
        return counts


class _TrainerCountedLossFunc(ASSoftmaxLossFunc):
    """The loss of :class:`ASSoftmaxTrainer`, whose ``num_items_in_batch`` counts the labels that
    are not ``ignore_index``, whatever its value."""

    def _check_ignore_index(self, ignore_index: int) -> None:
        pass


def _mark_ignored_labels(batch: Any, ignore_index: int) -> Any:
    """``batch`` with its ``labels`` equal to ``ignore_index`` set to -100 (a shallow copy; the
    batch the model sees is unchanged)."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("labels"), Tensor):
        return batch
    labels = batch["labels"]
    return {**batch, "labels": labels.masked_fill(labels == ignore_index, HF_IGNORE_INDEX)}


class ASSoftmaxTrainer(Trainer):
    """``transformers.Trainer`` training with the AS-Softmax loss and logging the masked ratio.

    Takes every ``Trainer`` argument, plus ``delta`` and ``ignore_index`` (see
    :class:`ASSoftmaxLossFunc`, which it installs as ``compute_loss_func``). With an
    ``ignore_index`` other than -100 the Trainer's ``num_items_in_batch`` counts the labels that are
    not ``ignore_index``, so a step's loss is still the mean over exactly its labels. Logged:

    * ``masked_ratio`` in every training log entry (each ``logging_steps``): masked / non-ignored
      labels over the micro-batches since the previous entry, summed over processes;
    * ``<metric_key_prefix>_masked_ratio`` in the metrics of ``evaluate()`` (``eval_masked_ratio``)
      and ``predict()`` (``test_masked_ratio``), over the whole evaluation set;
    * ``<metric_key_prefix>_ce_loss`` (``eval_ce_loss``) beside them: the plain cross entropy of the
      same logits, mean over the non-ignored labels, the number a plain ``Trainer`` reports as
      ``eval_loss`` (``eval_loss`` here is the AS-Softmax loss).

    The counts stay on the device between log entries; each entry reads them once, when the
    Trainer reads its own loss.

    Example::

        trainer = ASSoftmaxTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, delta=0.1)
        trainer.train()
        [entry["masked_ratio"] for entry in trainer.state.log_history if "masked_ratio" in entry]
    """

    def __init__(self, *args: Any, delta: float = 0.1, ignore_index: int = -100, **kwargs: Any) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "ASSoftmaxTrainer sets compute_loss_func itself (the AS-Softmax loss); drop the argument, "
                "or use transformers.Trainer(compute_loss_func=...) for a loss of your own."
            )
        if ignore_index != HF_IGNORE_INDEX and not hasattr(Trainer, "_get_num_items_in_batch"):
            raise ValueError(
                f"ASSoftmaxTrainer(ignore_index={ignore_index!r}) needs a newer transformers release (this "
                "one counts the labels of a step, num_items_in_batch, inside get_batch_samples, as the "
                "labels that are not -100): upgrade transformers, or set the ignored labels to -100 and "
                "keep the default ignore_index."
            )
        kwargs["compute_loss_func"] = _TrainerCountedLossFunc(delta, ignore_index)
        # The evaluation's plain cross entropy, summed; None outside an evaluation loop.
        self._as_softmax_ce_sum: Tensor | None = None
        super().__init__(*args, **kwargs)

    @property
    def as_softmax_loss_func(self) -> ASSoftmaxLossFunc:
        return self.compute_loss_func

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | int | None:
        # The Trainer counts labels != -100. Count the loss's own ignore_index instead, and leave the
        # rest to the Trainer: the accumulation window, the sum over processes, the parallel sizes.
        ignore_index = self.as_softmax_loss_func.criterion.ignore_index
        if ignore_index != HF_IGNORE_INDEX:
            batch_samples = [_mark_ignored_labels(batch, ignore_index) for batch in batch_samples]
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs.get("labels")  # the Trainer pops them before calling the loss function
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self._as_softmax_ce_sum is not None and labels is not None:
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            if logits.dim() > 2:
                logits = logits.movedim(-1, 1)  # (N, L, C) -> (N, C, L)
            ignore_index = self.as_softmax_loss_func.criterion.ignore_index
            self._as_softmax_ce_sum = self._as_softmax_ce_sum + F.cross_entropy(
                logits.detach().float(), labels, ignore_index=ignore_index, reduction="sum"
            ).to(self._as_softmax_ce_sum.device)
        return (loss, outputs) if return_outputs else loss

    def _as_softmax_ratio(self, counts: tuple[Tensor, Tensor] | None) -> float | None:
        """Masked / valid over all processes; ``None`` when no process made a loss call. Every
        process takes part in the reduction, also one without counts."""
        device = self.args.device
        if counts is None:
            local = torch.zeros(3, dtype=torch.long, device=device)
        else:
            local = torch.stack([counts[0].to(device), counts[1].to(device), torch.ones((), device=device)]).long()
        masked, valid, calls = (int(v) for v in self.accelerator.reduce(local, reduction="sum").tolist())
        if not calls:
            return None
        return masked / valid if valid else 0.0

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # A training entry holds the running "loss"; evaluation and end-of-training entries do not.
        if "loss" in logs:
            ratio = self._as_softmax_ratio(self.as_softmax_loss_func.pop_counts())
            if ratio is not None:
                logs["masked_ratio"] = ratio
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        loss_func = self.as_softmax_loss_func
        training_counts = loss_func.pop_counts()  # an evaluation inside training: keep them apart
        self._as_softmax_ce_sum = torch.zeros((), dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            counts = loss_func.pop_counts()
            ce_sum = self._as_softmax_ce_sum
        finally:
            loss_func.counts = training_counts
            self._as_softmax_ce_sum = None
        ratio = self._as_softmax_ratio(counts)
        if ratio is not None:
            output.metrics[f"{metric_key_prefix}_masked_ratio"] = ratio
            valid = counts[1].to(self.args.device).double() if counts is not None else ce_sum.new_zeros(())
            total, valid = self.accelerator.reduce(torch.stack([ce_sum, valid]), reduction="sum").tolist()
            output.metrics[f"{metric_key_prefix}_ce_loss"] = total / valid if valid else 0.0
        return output
