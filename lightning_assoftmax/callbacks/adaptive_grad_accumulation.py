"""``AdaptiveGradAccumulation``: the paper's AS-Speed, made exact under Lightning's accumulation loop."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_assoftmax.callbacks._checks import warn_if_loss_never_masks
from lightning_assoftmax.callbacks.step_outputs import training_step_counts
from lightning_assoftmax.functional import next_accumulation_steps

__all__ = ["AdaptiveGradAccumulation"]

# Layout of the per-window counter tensor (summed over micro-batches, then over ranks).
_MASKED, _VALID, _NONFINITE = 0, 1, 2


class AdaptiveGradAccumulation(Callback):
    r"""AS-Speed: gather more micro-batches per optimizer step as more samples reach a zero loss.

    With AS-Softmax a sample whose target beats every other class by the margin gets an exact zero
    loss and gradient (a *masked sample*), so a batch's mean-loss gradient comes from fewer and
    fewer samples. After every optimizer step this callback takes the masked-sample ratio
    :math:`\rho` of the window that just ended (masked / non-ignored samples, pooled over the
    window's micro-batches and summed over all processes) and sets the next window size
    (Lv et al., TASLP 2025, AS-Speed; :func:`~lightning_assoftmax.functional.next_accumulation_steps`):

    .. math:: k \leftarrow \min\bigl(\max(\mathrm{round}(\lambda / (1 - \rho)), k),\ k + 1,\ k_{\max}\bigr)

    so ``k`` starts at 1 (at every fresh ``fit``), never shrinks, grows by at most one at a time
    and stops at ``max_accumulate_grad_batches``.
    Fewer optimizer steps (and fewer scheduler and clipping steps) are taken, each over about as
    many non-zero-loss samples as one plain batch had.

    It drives ``trainer.accumulate_grad_batches``, which Lightning reads at every batch, and keeps
    every optimizer step's gradient equal to the mean of the per-micro-batch mean-loss gradients
    over exactly the micro-batches of its window:

    * a new ``k`` takes effect only at a batch index that is a multiple of both the current and the
      new value (Lightning zeroes gradients when ``batch_idx % k == 0`` and steps when
      ``(batch_idx + 1) % k == 0``; any other switch point re-applies stale gradients or
      under-scales a window). Until then it is *pending*; an epoch start is always aligned;
    * the epoch's last window may hold ``m < k`` micro-batches, each scaled by ``1/k`` by
      Lightning; its gradient is multiplied by ``k/m`` in ``on_before_optimizer_step``, before
      gradient clipping and the optimizer step;
    * under DDP the window counts are summed over all processes before the decision, so every rank
      picks the same ``k`` (ranks that disagree on when to step would deadlock).

    A window with no non-ignored sample, or in which any process saw a non-finite training loss,
    keeps the current ``k``.

    The counts come from the training step, in one of two ways:

    * ``training_step`` returns ``{"loss": loss, "masked_count": m, "valid_count": v}`` (0-dim
      integer tensors), from any module: ``loss, m, v = ASSoftmaxLoss(delta).loss_and_stats(logits,
      target)`` or the functional ``as_softmax_loss_and_stats``;
    * or the module uses :class:`~lightning_assoftmax.ASSoftmaxMixin` and computes its training
      loss with ``self.as_softmax_loss``: the call made with ``log=True`` (the default) is
      counted; give further calls in the same step (a second head, an auxiliary loss)
      ``log=False``.

    A module that provides neither is refused at its first training batch.

    The counts stay on the device; the window's decision reads them on the host once per
    optimizer step (one synchronisation per window, after the all-reduce), never per batch.

    Logs ``train/accumulate_grad_batches`` (the window size) at optimizer steps. When training ends it reports, on rank 0 and to the loggers (``train/optimizer_steps``,
    ``train/plain_optimizer_steps``), how many optimizer steps were taken against the one step
    per batch of a plain run; :meth:`summary` returns the same figures.

    Each ``fit`` that does not resume from a checkpoint starts afresh (``k = 1``, zero counters),
    also with an instance reused from an earlier fit. The state (current and pending ``k``, the
    open window's counts, the step counters) is saved in checkpoints, so a resumed fit continues
    with the same windows, from a checkpoint taken at an epoch's end or mid-epoch
    (``ModelCheckpoint(every_n_train_steps=...)``, a mid-epoch validation) when the data loader is
    resumable. A checkpoint taken inside a window also holds the gradients accumulated so far
    (Lightning saves none; on one device or under DDP, where they are averaged over the processes
    first), so the resumed window's step is the one of an uninterrupted run. Where they cannot be
    saved (a strategy that shards them, such as FSDP, or a checkpoint written by an earlier
    version), the resumed window's step is the mean over the micro-batches run after the resume,
    and a warning says so.

    Note:
        ``trainer.estimated_stepping_batches`` assumes a constant ``accumulate_grad_batches``.
        Until the first training batch the callback leaves the Trainer's value at 1, so the
        estimate read in ``configure_optimizers`` or ``on_train_start`` is the plain run's step
        count, an *upper bound* on the steps this callback takes: a schedule sized from it
        (``OneCycleLR(total_steps=...)``, a linear decay, ``DeltaWarmup``) does not reach its end,
        and a warm-up measured in steps lasts more batches. Size such schedules in epochs, or
        accept the truncation. The ready-made models' ``lr_schedule="linear"`` is placed by the
        share of epochs and batches done, so it still decays to 0 at the last batch.
        Read later, the estimate uses the current ``k`` for the whole run.
        ``Trainer(max_steps=...)`` counts optimizer steps, so it covers more batches with this
        callback than without.

    Refused (with an error saying what to change): manual optimization, strategies that handle
    accumulation themselves (DeepSpeed), ``Trainer(accumulate_grad_batches != 1)``, a
    ``GradientAccumulationScheduler`` in the same Trainer, anything else changing
    ``trainer.accumulate_grad_batches`` during training (e.g. the BatchNorm epoch of
    ``StochasticWeightAveraging``), and a module that gives no counts.

    Args:
        lam: :math:`\lambda`, the wanted number of non-masked batches' worth of samples per step
            (paper: 1). Positive and finite.
        max_accumulate_grad_batches: largest window size (the reference code's ``max_steps``: 2).
            An integer ``>= 1``; 1 disables accumulation.
        max_steps: deprecated name of ``max_accumulate_grad_batches`` (it collided with
            ``Trainer(max_steps=...)``); accepted with a ``FutureWarning`` until the next release.

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=2)])
        trainer.fit(model)  # model: class MyModel(ASSoftmaxMixin, L.LightningModule)
    """

    def __init__(self, lam: float = 1.0, max_accumulate_grad_batches: int = 2, *, max_steps: int | None = None) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise TypeError(f"AdaptiveGradAccumulation: lam must be a positive number, got {lam!r}.")
        if not (lam > 0 and math.isfinite(lam)):
            raise ValueError(
                f"AdaptiveGradAccumulation: lam must be a positive finite number, got {lam!r}; "
                "the paper uses lam=1 (one plain batch's worth of non-masked samples per step)."
            )
        name = "max_accumulate_grad_batches"
        if max_steps is not None:
            if max_accumulate_grad_batches != 2:
                raise TypeError(
                    f"AdaptiveGradAccumulation got both max_steps={max_steps!r} and "
                    f"max_accumulate_grad_batches={max_accumulate_grad_batches!r}; pass only "
                    "max_accumulate_grad_batches (max_steps is its deprecated name)."
                )
            rank_zero_warn(
                "AdaptiveGradAccumulation(max_steps=...) is deprecated and will be removed in the next "
                "release: it is the cap on the window size, unrelated to Trainer(max_steps=...). Use "
                f"AdaptiveGradAccumulation(max_accumulate_grad_batches={max_steps!r}) instead.",
                category=FutureWarning,
            )
            name, max_accumulate_grad_batches = "max_steps", max_steps
        cap = max_accumulate_grad_batches
        if isinstance(cap, bool) or not isinstance(cap, int):
            raise TypeError(f"AdaptiveGradAccumulation: {name} must be an integer >= 1, got {cap!r}.")
        if cap < 1:
            raise ValueError(
                f"AdaptiveGradAccumulation: {name} must be >= 1 (the largest window size), got {cap}; "
                f"use {name}=1 to never accumulate, or 2 as in the reference code."
            )
        self.lam = float(lam)
        self.max_accumulate_grad_batches = int(cap)
        self._warnings = WarningCache()
        self._reset_state()

    # -- public state -----------------------------------------------------------------------
    @property
    def accumulate_grad_batches(self) -> int:
        """The window size in force (micro-batches per optimizer step)."""
        return self._k

    @property
    def pending_accumulate_grad_batches(self) -> int | None:
        """A decided window size waiting for an aligned batch index, or ``None``."""
        return self._pending

    def summary(self) -> dict[str, Any]:
        """Optimizer steps taken and training batches seen (over completed windows), this and resumed fits.

        ``plain_optimizer_steps`` is what ``accumulate_grad_batches=1`` would take for the same batches;
        ``window_sizes`` maps a window size to how many windows had it (a short epoch tail counts
        with its actual length).
        """
        return {
            "optimizer_steps": self._optimizer_steps,
            "plain_optimizer_steps": self._micro_batches,
            "window_sizes": dict(sorted(self._window_sizes.items())),
            "accumulate_grad_batches": self._k,
        }

    # -- configuration checks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A fresh fit starts at k=1 with zero counters, also for an instance reused from an earlier
        # fit; a resumed fit then gets its state from the checkpoint (restored after setup).
        self._reset_state()
        self._trainer, self._module = trainer, pl_module
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "AdaptiveGradAccumulation needs automatic optimization: Lightning only accumulates gradients "
                f"for you there, and {type(pl_module).__name__} sets `self.automatic_optimization = False`. "
                "Remove the callback, or let Lightning run the optimizer (automatic_optimization=True)."
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise RuntimeError(
                f"AdaptiveGradAccumulation cannot drive {type(trainer.strategy).__name__}: this strategy "
                "(e.g. DeepSpeed) fixes gradient accumulation in its own engine when training starts. "
                "Use strategy='ddp' or 'fsdp', or remove the callback."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) conflicts with "
                "AdaptiveGradAccumulation, which sets it at every window. Remove the Trainer argument "
                "(cap the window with AdaptiveGradAccumulation(max_accumulate_grad_batches=...) instead)."
            )
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            raise ValueError(
                "GradientAccumulationScheduler and AdaptiveGradAccumulation both set "
                "trainer.accumulate_grad_batches; keep only one of them in Trainer(callbacks=...)."
            )
        warn_if_loss_never_masks(pl_module, "AdaptiveGradAccumulation", "every optimizer step stays one batch")

    # -- the loop ---------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A window cut short without a step (on_train_batch_start returned -1, or a stop request)
        # never reached the optimizer: its gradients are zeroed at batch 0, so drop its counts too.
        self._window_batches = 0
        self._window_counts = None
        self._logged_k = None
        self._unsaved_batches = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._check_not_overridden(trainer)
        k, pending = self._k, self._pending
        # Lightning zeroes grads at batch_idx % k == 0 and steps at (batch_idx + 1) % k == 0: switch
        # only where the current window has just ended and the new one starts on its own boundary.
        if pending is not None and batch_idx % k == 0 and batch_idx % pending == 0:
            self._k, self._pending = pending, None
        trainer.accumulate_grad_batches = self._set_value = self._k
        if self._restored_gradients is not None:
            gradients, self._restored_gradients = self._restored_gradients, None
            # Lightning zeroes gradients only at a window's first batch: these are kept.
            if batch_idx % self._k != 0:
                self._put_gradients(pl_module, gradients)
        self._batch_idx = batch_idx
        self._stepped = False
        if hasattr(pl_module, "as_softmax_last_stats"):  # ASSoftmaxMixin: a batch without a logging call reads None
            pl_module.as_softmax_last_stats = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        self._stepped = True
        # Micro-batches whose gradients are in param.grad: a window resumed from a checkpoint
        # taken inside it lacks the ones run before the checkpoint (checkpoints hold no gradients).
        in_window = self._batch_idx % self._k + 1 - self._unsaved_batches
        self._unsaved_batches = 0
        if in_window == self._k:
            return
        # Short epoch tail (or resumed window): Lightning divided each of its m losses by k; make
        # the step the mean over those m.
        factor = self._k / in_window
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.mul_(factor)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check_not_overridden(trainer)
        self._add_micro_batch(pl_module, outputs)
        if not self._stepped:
            return
        if self._k != self._logged_k:
            # Lightning re-sends an on_step value at every logging step until the epoch ends, so
            # logging k when it changes (and once per epoch) saves a `self.log` call per step,
            # about 0.3 ms on a CPU.
            # A CPU tensor, not a float that Lightning would copy to the device (a synchronisation).
            pl_module.log("train/accumulate_grad_batches", torch.tensor(float(self._k)), on_step=True, on_epoch=False, batch_size=1)
            self._logged_k = self._k
        counts = self._window_counts
        if counts is None:
            counts = torch.zeros(3, dtype=torch.long, device=pl_module.device)
        # Every rank reaches this point at the same batch (same k, same step timing), so the
        # collective cannot deadlock; afterwards all ranks hold the same numbers.
        # The one host read of the window (allowed once per optimizer step), after the all-reduce.
        masked, valid, nonfinite = (int(v) for v in trainer.strategy.reduce(counts.clone(), reduce_op="sum").tolist())
        self._optimizer_steps += 1
        self._micro_batches += self._window_batches
        self._window_sizes[self._window_batches] += 1
        self._window_batches = 0
        self._window_counts = None
        if nonfinite or valid == 0:
            return
        wanted = next_accumulation_steps(masked / valid, self._k, self.lam, self.max_accumulate_grad_batches)
        if wanted > self._k and (self._pending is None or wanted > self._pending):
            self._pending = wanted

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        info = self.summary()
        steps, plain = info["optimizer_steps"], info["plain_optimizer_steps"]
        saved = f", {100.0 * (1 - steps / plain):.1f}% fewer" if plain else ""
        sizes = ", ".join(f"{size}: {count}" for size, count in info["window_sizes"].items())
        rank_zero_info(
            f"AdaptiveGradAccumulation: {steps} optimizer steps over {plain} training batches "
            f"(a plain run takes {plain}){saved}; windows by size {{{sizes}}}; "
            f"accumulate_grad_batches is now {self._k}."
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {"train/optimizer_steps": float(steps), "train/plain_optimizer_steps": float(plain)},
                step=trainer.global_step,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer = self._module = None
        if stage == "fit" and self._set_value is not None:
            # Leave the Trainer as configured, so a later fit/validate with it starts clean.
            trainer.accumulate_grad_batches = 1
            self._set_value = None

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        counts = [0, 0, 0] if self._window_counts is None else [int(v) for v in self._window_counts.tolist()]
        return {
            "lam": self.lam,
            "max_accumulate_grad_batches": self.max_accumulate_grad_batches,
            "accumulate_grad_batches": self._k,
            "pending": self._pending,
            "window_batches": self._window_batches,
            "window_counts": counts,
            "optimizer_steps": self._optimizer_steps,
            "micro_batches": self._micro_batches,
            "window_sizes": dict(self._window_sizes),
            "window_gradients": self._window_gradients(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._k = int(state_dict["accumulate_grad_batches"])
        pending = state_dict.get("pending")
        self._pending = None if pending is None else int(pending)
        self._window_batches = int(state_dict.get("window_batches", 0))
        counts = state_dict.get("window_counts", [0, 0, 0])
        self._window_counts = torch.tensor(counts, dtype=torch.long) if self._window_batches else None
        gradients = state_dict.get("window_gradients")
        self._restored_gradients = gradients if self._window_batches and gradients is not None else None
        self._unsaved_batches = self._window_batches if self._restored_gradients is None else 0
        if self._unsaved_batches:
            rank_zero_warn(
                f"AdaptiveGradAccumulation: this checkpoint was taken inside an accumulation window, after "
                f"{self._window_batches} of its {self._k} micro-batches, and holds no gradients of them (it was "
                "written by an earlier version, or under a strategy that shards gradients, such as FSDP). The "
                "resumed window's optimizer step is the mean over the micro-batches run after the resume "
                "only. For an exact continuation, resume from a checkpoint taken at an optimizer step, e.g. "
                "ModelCheckpoint(every_n_train_steps=...)."
            )
        self._optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self._micro_batches = int(state_dict.get("micro_batches", 0))
        self._window_sizes = Counter({int(k): int(v) for k, v in state_dict.get("window_sizes", {}).items()})
        cap = self.max_accumulate_grad_batches
        # Checkpoints written before the rename hold the cap as "max_steps".
        saved = (state_dict.get("lam", self.lam), state_dict.get("max_accumulate_grad_batches", state_dict.get("max_steps", cap)))
        if saved != (self.lam, cap):
            rank_zero_warn(
                f"AdaptiveGradAccumulation resumed with lam={self.lam}, max_accumulate_grad_batches={cap} from a "
                f"checkpoint made with lam={saved[0]}, max_accumulate_grad_batches={saved[1]}; the new values "
                "apply from now on."
            )
        if max(self._k, self._pending or 0) > cap:
            # Shrinking also has to wait for an aligned batch index, so it goes through `pending`.
            self._pending = cap

    # -- internals --------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._k = 1
        self._pending: int | None = None
        self._set_value: int | None = None
        self._logged_k: int | None = None
        self._batch_idx = 0
        self._stepped = False
        self._window_batches = 0
        self._unsaved_batches = 0
        self._window_counts: Tensor | None = None
        self._optimizer_steps = 0
        self._micro_batches = 0
        self._window_sizes: Counter[int] = Counter()
        self._counted_batches = 0
        self._restored_gradients: dict[str, Tensor] | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    def _window_gradients(self) -> dict[str, Tensor] | None:
        """The gradients accumulated in the open window, by parameter name, on the CPU; ``None``
        where they cannot be saved."""
        if not self._window_batches:
            return None
        if self._restored_gradients is not None:  # restored, not yet put back
            return self._restored_gradients
        trainer, module = self._trainer, self._module
        if trainer is None or module is None:
            return None
        strategy = trainer.strategy
        # Every process holds whole parameters only on one device and under DDP (FSDP and
        # model-parallel strategies shard them).
        if type(strategy) is not SingleDeviceStrategy and type(strategy) is not DDPStrategy:
            return None
        gradients = {}
        for name, param in module.named_parameters():
            if param.grad is None:
                continue
            grad = param.grad.detach()
            if trainer.world_size > 1:
                # DDP accumulates local sums between synchronisations and averages them at the
                # window's last backward: restoring the average on every process gives the same
                # step (averaging is linear), whatever process saves. Every process saves together.
                grad = strategy.reduce(grad.clone(), reduce_op="mean")
            gradients[name] = grad.to("cpu", copy=True)
        return gradients

    @staticmethod
    def _put_gradients(pl_module: pl.LightningModule, gradients: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                saved = gradients.get(name)
                if saved is None:
                    continue
                saved = saved.to(device=param.device, dtype=param.dtype)
                if param.grad is None:
                    param.grad = saved
                else:
                    param.grad.copy_(saved)

    def _check_not_overridden(self, trainer: pl.Trainer) -> None:
        if self._set_value is not None and trainer.accumulate_grad_batches != self._set_value:
            raise RuntimeError(
                f"trainer.accumulate_grad_batches was changed to {trainer.accumulate_grad_batches} by something "
                f"other than AdaptiveGradAccumulation (which had set {self._set_value}), e.g. "
                "StochasticWeightAveraging's BatchNorm epoch or a custom callback. Only one component may "
                "drive it: remove the other one or AdaptiveGradAccumulation."
            )

    def _add_micro_batch(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        self._window_batches += 1
        stats = training_step_counts(pl_module, outputs)
        device = pl_module.device
        if self._window_counts is None or self._window_counts.device != device:
            base = torch.zeros(3, dtype=torch.long, device=device)
            if self._window_counts is not None:  # restored from a checkpoint on the CPU
                base += self._window_counts.to(device)
            self._window_counts = base
        if stats is None:
            self._no_counts(pl_module, outputs)
        else:
            self._counted_batches += 1
            masked, valid = stats
            self._window_counts[_MASKED] += masked.to(device)
            self._window_counts[_VALID] += valid.to(device)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # A NaN/inf loss must not be read as "confident": the window keeps its size.
            self._window_counts[_NONFINITE] += (~torch.isfinite(loss.detach())).any().to(device)

    def _no_counts(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        from lightning_assoftmax.mixin import ASSoftmaxMixin

        name = type(pl_module).__name__
        if not isinstance(pl_module, ASSoftmaxMixin) and self._counted_batches == 0:
            keys = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
            raise TypeError(
                f"AdaptiveGradAccumulation needs the masked and valid sample counts of every training batch, "
                f"but the output of {name}.training_step has no 'masked_count' and 'valid_count' (it has "
                f"{keys}) and {name} does not use ASSoftmaxMixin. Either "
                '(a) return {"loss": loss, "masked_count": masked, "valid_count": valid} from training_step, '
                "e.g. with `loss, masked, valid = ASSoftmaxLoss(delta).loss_and_stats(logits, target)`, or (b) "
                f"declare `class {name}(ASSoftmaxMixin, L.LightningModule)` and compute the loss with "
                "`self.as_softmax_loss(logits, target)`."
            )
        self._warnings.warn(
            "AdaptiveGradAccumulation: a training batch gave no masked/valid counts (no "
            "`self.as_softmax_loss(..., log=True)` call, and no 'masked_count'/'valid_count' in the "
            "training_step output), so it counts as having no valid samples (a window without valid "
            "samples keeps its size)."
        )
