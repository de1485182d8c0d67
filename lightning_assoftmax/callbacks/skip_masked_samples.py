"""``SkipMaskedSamples``: training samples that were masked at their last visit sit out the next epochs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
)

from lightning_assoftmax.callbacks._checks import warn_if_loss_never_masks
from lightning_assoftmax.functional.sample_rest import (
    live_samples,
    shard_indices,
    update_rest_schedule,
)

__all__ = ["SkipMaskedSamples"]

_OUTPUT_KEY = "masked_samples"
_UNSHARDED_SAMPLERS = (SequentialSampler, RandomSampler, SubsetRandomSampler)
# torchdata's StatefulDataLoader brings its own (stateful) versions of these; told apart by name so
# that torchdata stays optional.
_TORCHDATA_SAMPLERS = "torchdata.stateful_dataloader.sampler"


def _is_torchdata(sampler: Any, name: str) -> bool:
    return type(sampler).__module__ == _TORCHDATA_SAMPLERS and type(sampler).__name__ == name


class SkipMaskedSamples(Callback):
    r"""Leaves training samples that were masked at their last visit out of the next epochs' batches.

    With AS-Softmax a sample whose target beats every other class by the margin has a loss and a
    gradient that are *exactly* zero (a *masked sample*): running it through the forward and
    backward pass computes nothing but zeros. This callback remembers, per training sample,
    whether it was masked at its last visit and rests such samples: after the :math:`s`-th
    consecutive masked visit a sample sits out

    .. math:: r(s) = \min(2^{s-1}, r_{\max}) \text{ epochs}

    (1, 2, 4, ... capped at ``max_rest``) and is then visited again; a visit that finds it
    unmasked puts it back into every epoch. The last ``full_data_epochs`` epochs use every sample.
    Batches stay full: the live samples are shuffled and batched as before, so an epoch becomes
    shorter, not sparser.

    What is exact and what is not: a resting sample had an exactly zero loss and gradient at its
    last visit, so leaving it out of that epoch's batches changes nothing *for the weights of
    that visit*. The weights have moved since, and the sample may have become unmasked while it
    rests; the schedule bounds that staleness: no sample goes more than ``max_rest`` epochs
    without a check, and each is checked in the final full-data epochs. The share of returning
    samples found unmasked is logged (``train/returned_unmasked_share``) to show how often that
    happened.

    Per-sample flags come from :class:`~lightning_assoftmax.ASSoftmaxMixin` (the training
    ``as_softmax_loss`` call; a token-level sample is masked when all its non-ignored positions
    are), or from ``training_step`` returning ``{"loss": ..., "masked_samples": flags}`` with a
    bool ``(N,)`` tensor for the batch's samples.

    How it finds the samples: the training ``DataLoader`` is rebuilt (once per fit, or per reload)
    with a sampler that yields the live sample indices of each epoch, in the order the original
    sampler would have used (``shuffle=True``/``False``, ``SubsetRandomSampler``, or, under DDP,
    the ``DistributedSampler`` Lightning would inject, with its seed), each process getting its
    shard. torchdata's ``StatefulDataLoader`` (and its samplers) is accepted too: on a resume it
    skips the batches it had yielded itself, and the sampler starts the epoch's saved order from
    its first index. Batch ``i`` of an epoch holds known dataset indices, so a batch's flags map back to
    samples without any change to the batch format. When nothing rests the batches are exactly
    those of a run without the callback.

    Synchronisation: none per batch. Each batch's flags are copied to the host without blocking
    and read once per epoch (and at a checkpoint), where they are summed over all processes
    (one all-reduce of two ``(n,)`` integer vectors), so that every process rests the same
    samples. At most one host synchronisation per epoch.

    Lightning sees an epoch length that changes from epoch to epoch: ``trainer.num_training_batches``,
    the progress bar and a fractional ``val_check_interval`` follow it (set at each epoch
    start). ``trainer.estimated_stepping_batches``, read before training, assumes full epochs
    and is an upper bound: an LR schedule or ``DeltaWarmup`` sized from it does not reach its end.
    An integer ``val_check_interval`` counts batches per epoch and may not be reached in a short
    epoch (use ``check_val_every_n_epoch=None`` to count across epochs). ``Trainer(max_steps=...)``
    takes more epochs to reach.

    Checkpoints hold the per-sample state, the epoch's live set and order and the flags collected
    so far, so a resumed fit continues as an uninterrupted one, also from a checkpoint taken in
    the middle of an epoch (the rest of that epoch's batches follow) or after an epoch's last batch
    (Lightning then starts the next epoch without ``on_train_epoch_start``; the callback gives it
    its own length and live samples when training starts). Later epochs are identical
    when their order is reproducible (under DDP, ``shuffle=False``, or a ``DistributedSampler``);
    a one-device ``shuffle=True`` order comes from torch's global random state, which Lightning
    does not checkpoint.

    Logs per epoch ``train/resting_share`` (share of the training samples left out),
    ``train/epoch_batches`` (batches run by each process) and, when samples came back from a rest,
    ``train/returned_unmasked_share``; at the end of training ``train/batches_run`` and
    ``train/full_batches`` (what the same epochs take with every sample). :meth:`summary` returns
    the same figures.

    Refused with an error saying what to change: several training dataloaders, an iterable-style
    dataset, a custom batch sampler or sampler (other than the ones above), ``in_order=False``,
    ``overfit_batches``, and a ``training_step`` that takes ``dataloader_iter``.

    Args:
        max_rest: longest rest in epochs (``>= 0``; 0 rests nothing: every sample in every epoch).
        full_data_epochs: number of final epochs that use every sample (``>= 0``). They are
            placed by ``Trainer(max_epochs)``, or, with ``max_steps``, once the remaining optimizer
            steps fit into that many full epochs.

    Example::

        trainer = L.Trainer(max_epochs=8, callbacks=[SkipMaskedSamples(max_rest=4)])
        trainer.fit(model, datamodule)  # model: class MyModel(ASSoftmaxMixin, L.LightningModule)
    """

    def __init__(self, max_rest: int = 4, full_data_epochs: int = 1) -> None:
        for name, value in (("max_rest", max_rest), ("full_data_epochs", full_data_epochs)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SkipMaskedSamples: {name} must be an integer >= 0, got {value!r}.")
            if value < 0:
                raise ValueError(
                    f"SkipMaskedSamples: {name} must be >= 0, got {value}; "
                    + (
                        "use max_rest=0 to rest nothing, or e.g. 4 (a sample is re-checked at least every 4 epochs)."
                        if name == "max_rest"
                        else "use 0 for no final full-data epoch, or 1 (the default)."
                    )
                )
        self.max_rest = max_rest
        self.full_data_epochs = full_data_epochs
        self._warnings = WarningCache()
        self._trainer: pl.Trainer | None = None
        self._source: Any = None
        self._reset_state()

    # -- public state -----------------------------------------------------------------------
    @property
    def live_mask(self) -> Tensor | None:
        """Bool ``(n,)``: the training samples in the current epoch's batches (``None`` before training)."""
        return None if self._live is None else self._live.clone()

    def summary(self) -> dict[str, Any]:
        """Training batches run (per process) against a full-data run of the same epochs, and one
        record per epoch: ``epoch``, ``live`` and ``resting`` samples, ``batches``, ``full_batches``."""
        run = sum(record["batches"] for record in self._history)
        full = sum(record["full_batches"] for record in self._history)
        return {
            "batches_run": run,
            "full_batches": full,
            "saved_share": (1.0 - run / full) if full else 0.0,
            "epochs": [dict(record) for record in self._history],
        }

    # -- configuration ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.overfit_batches:
            raise ValueError(
                f"SkipMaskedSamples cannot run with Trainer(overfit_batches={trainer.overfit_batches}): "
                "overfitting repeats a fixed set of batches. Remove one of the two."
            )
        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise ValueError(
                f"SkipMaskedSamples needs to know which samples each batch holds, but "
                f"{type(pl_module).__name__}.training_step takes `dataloader_iter` and fetches batches "
                "itself. Take `(batch, batch_idx)` instead, or remove the callback."
            )
        if isinstance(trainer.val_check_interval, int) and trainer.check_val_every_n_epoch is not None:
            rank_zero_warn(
                f"SkipMaskedSamples shortens epochs, and Trainer(val_check_interval={trainer.val_check_interval}) "
                "counts batches within an epoch: an epoch shorter than that runs no validation. Set "
                "check_val_every_n_epoch=None to count batches across epochs, or use a fraction."
            )
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not callable(getattr(source, "dataloader", None)):
            raise RuntimeError(
                "SkipMaskedSamples could not find the training dataloader source of this Lightning "
                f"version ({pl.__version__}); it needs lightning>=2.4."
            )
        warn_if_loss_never_masks(pl_module, "SkipMaskedSamples", "every sample runs in every epoch")
        self._reset_state()
        self._trainer = trainer
        self._source = source
        original = source.dataloader
        # Called by Lightning inside its DataLoader-capturing context, before it processes the
        # loader: the rebuilt loader already carries a DistributedSampler subclass, so Lightning
        # leaves it as it is under DDP.
        source.dataloader = lambda: self._rebuild(trainer, original())
        if hasattr(pl_module, "as_softmax_track_masked_samples"):
            pl_module.as_softmax_track_masked_samples = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._source is not None and "dataloader" in vars(self._source):
            del self._source.dataloader
        self._source = None
        self._trainer = None
        if hasattr(pl_module, "as_softmax_track_masked_samples"):
            pl_module.as_softmax_track_masked_samples = False
            pl_module.as_softmax_last_masked_samples = None

    # -- the loop ---------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint saved after an epoch's last batch but before its epoch-end hooks (e.g.
        # ModelCheckpoint(every_n_train_steps=...)) resumes into the next epoch without
        # on_train_epoch_start, with the loader iterator and length Lightning made (in
        # setup_data) for the epoch that was finished. Make the iterator again for the next
        # epoch (a worker process may already have drawn the old indices) with that epoch's
        # length. The loop's own count (trainer.num_training_batches) must stay the finished
        # epoch's until the epoch loop has compared its restored batch count with it (which
        # starts the new epoch at batch 0): it is set at the first batch.
        loop = trainer.fit_loop
        if self._epoch is None or loop._combined_loader is None or loop._data_fetcher is None:
            return
        # Lightning's own test for this case (its fit loop has already moved to the next epoch);
        # the epoch comparison covers versions without these properties.
        epoch_loop = loop.epoch_loop
        finished = (
            getattr(loop, "restarted_mid_epoch", False)
            and getattr(epoch_loop, "restarted_on_train_batch_end", False)
            and epoch_loop.batch_progress.is_last_batch
        )
        if not finished and self._current_epoch(trainer) == self._epoch:
            return
        loop._combined_loader.limits = [self._epoch_length(trainer)]
        iter(loop._data_fetcher)
        self._length_pending = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_epoch_length(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._length_pending:
            self._length_pending = False
            self._set_epoch_length(trainer)
        if hasattr(pl_module, "as_softmax_last_masked_samples"):
            pl_module.as_softmax_last_masked_samples = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        indices = self._batch_indices(batch_idx)
        flags = outputs.get(_OUTPUT_KEY) if isinstance(outputs, Mapping) else None
        if flags is None:
            flags = getattr(pl_module, "as_softmax_last_masked_samples", None)
        if flags is None:
            self._warnings.warn(
                "SkipMaskedSamples: a training batch reported no per-sample masked flags, so its samples "
                "count as unmasked (none of them rests). Compute the training loss with "
                "`self.as_softmax_loss(...)` (ASSoftmaxMixin), or return "
                f"{{'loss': loss, '{_OUTPUT_KEY}': flags}} from training_step with a bool (N,) tensor."
            )
            flags = torch.zeros(indices.numel(), dtype=torch.bool)
        elif not isinstance(flags, Tensor) or flags.dim() != 1 or flags.numel() != indices.numel():
            shape = tuple(flags.shape) if isinstance(flags, Tensor) else type(flags).__name__
            raise RuntimeError(
                f"SkipMaskedSamples: batch {batch_idx} holds {indices.numel()} samples but its masked flags "
                f"have shape {shape}; they must be one bool per sample, (N,), in batch order. A collate_fn "
                "or training_step that drops, adds or reorders samples cannot be tracked."
            )
        # Non-blocking: the flags are read once per epoch, after one synchronisation.
        self._pending.append((indices, flags.detach().to("cpu", non_blocking=True, copy=True)))
        self._batches_done = batch_idx + 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch is None:
            return
        record = self._finish_epoch()
        pl_module.log("train/resting_share", record["resting"] / max(1, self._population_size()), on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        pl_module.log("train/epoch_batches", float(record["batches"]), on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        if record["returned"]:
            share = record["returned_unmasked"] / record["returned"]
            pl_module.log("train/returned_unmasked_share", share, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        # Plan the next epoch now, so that whatever reads its length first (a progress bar listed
        # before this callback) sees it; on_train_epoch_start sets it again.
        self._plan(self._current_epoch(trainer))
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._set_epoch_length(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        info = self.summary()
        run, full = info["batches_run"], info["full_batches"]
        rank_zero_info(
            f"SkipMaskedSamples: {run} training batches run of {full} with every sample "
            f"({100.0 * info['saved_share']:.1f}% fewer), max_rest={self.max_rest}."
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {"train/batches_run": float(run), "train/full_batches": float(full)}, step=trainer.global_step
            )

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None and self._epoch is not None:
            # Fold in (and, under DDP, sum over processes) the flags collected so far, so that a
            # resumed fit continues with them. Every process saves a checkpoint together.
            self._fold_pending()
        return {
            "max_rest": self.max_rest,
            "full_data_epochs": self.full_data_epochs,
            "num_samples": self._n,
            "masked_streak": self._streak,
            "next_live_epoch": self._next_live,
            "epoch": self._epoch,
            "live": self._live,
            "order": self._order,
            "batches_done": self._batches_done,
            "epoch_visits": self._visits,
            "epoch_masked_visits": self._masked_visits,
            "history": [dict(record) for record in self._history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._n = state_dict["num_samples"]
        self._streak = state_dict["masked_streak"]
        self._next_live = state_dict["next_live_epoch"]
        self._epoch = state_dict["epoch"]
        self._live = state_dict["live"]
        # The order of an epoch already under way; one not begun is drawn again.
        self._order = state_dict["order"] if state_dict["batches_done"] > 0 else None
        self._batches_done = int(state_dict["batches_done"])
        self._resume_batches = self._batches_done
        self._visits = state_dict["epoch_visits"]
        self._masked_visits = state_dict["epoch_masked_visits"]
        self._history = [dict(record) for record in state_dict.get("history", [])]
        saved = (state_dict.get("max_rest", self.max_rest), state_dict.get("full_data_epochs", self.full_data_epochs))
        if saved != (self.max_rest, self.full_data_epochs):
            rank_zero_warn(
                f"SkipMaskedSamples resumed with max_rest={self.max_rest}, full_data_epochs={self.full_data_epochs} "
                f"from a checkpoint made with max_rest={saved[0]}, full_data_epochs={saved[1]}; the new values "
                "apply from the next epoch on."
            )

    # -- the training dataloader ------------------------------------------------------------
    def _rebuild(self, trainer: pl.Trainer, loader: Any) -> DataLoader:
        """The user's training loader with the live-sample sampler in place of its own."""
        if not isinstance(loader, DataLoader):
            raise TypeError(
                "SkipMaskedSamples needs the training data as one torch DataLoader, got "
                f"{type(loader).__name__}. Return a single DataLoader from train_dataloader() (several "
                "training loaders or a CombinedLoader are not supported)."
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"SkipMaskedSamples needs a map-style dataset (with __len__ and __getitem__) to leave samples "
                f"out by index; {type(dataset).__name__} is iterable-style. Use a map-style dataset, or remove "
                "the callback."
            )
        own_batching = type(loader.batch_sampler) is BatchSampler or _is_torchdata(loader.batch_sampler, "BatchSampler")
        if not own_batching or loader.batch_size is None:
            got = "batch_size=None" if loader.batch_sampler is None else f"batch_sampler={type(loader.batch_sampler).__name__}(...)"
            raise TypeError(
                f"SkipMaskedSamples batches the live samples itself and needs the DataLoader's own batching "
                f"(DataLoader(dataset, batch_size=..., shuffle=..., drop_last=...)), got {got}. Pass "
                "batch_size (and sampler or shuffle) instead of a batch_sampler, or remove the callback."
            )
        if not getattr(loader, "in_order", True):
            raise ValueError(
                "SkipMaskedSamples maps batch i of an epoch to its samples, which needs batches in order: "
                "remove DataLoader(in_order=False)."
            )
        n = len(dataset)
        if self._n is not None and self._n != n:
            raise ValueError(
                f"SkipMaskedSamples tracks {self._n} training samples, but the training dataset now has {n}. "
                "The dataset must keep its size during a fit (and across a resume)."
            )
        self._n = n
        if self._streak is None:
            self._streak = torch.zeros(n, dtype=torch.int32)
            self._next_live = torch.zeros(n, dtype=torch.int64)
            self._visits = torch.zeros(n, dtype=torch.int32)
            self._masked_visits = torch.zeros(n, dtype=torch.int32)
        # The order comes from the batch sampler's sampler (the DataLoader's own `sampler` is a
        # placeholder when a batch_sampler was given).
        base = loader.batch_sampler.sampler
        population: Tensor | None = None
        random = type(base) is RandomSampler or _is_torchdata(base, "RandomSampler")
        if type(base) is DistributedSampler or _is_torchdata(base, "StatefulDistributedSampler"):
            shards = {"num_replicas": base.num_replicas, "rank": base.rank, "shuffle": base.shuffle, "seed": base.seed, "drop_last": base.drop_last}
        elif random or type(base) in _UNSHARDED_SAMPLERS:
            if random and (base.replacement or base.num_samples != n):
                raise ValueError(
                    "SkipMaskedSamples needs every sample drawn once per epoch; RandomSampler(replacement=True) "
                    "or num_samples != len(dataset) draws some samples several times or not at all. Use shuffle=True."
                )
            if type(base) is SubsetRandomSampler:
                population = torch.zeros(n, dtype=torch.bool)
                population[torch.as_tensor(list(base.indices), dtype=torch.long)] = True
            shards = None
            if trainer._data_connector._requires_distributed_sampler(loader):
                if type(base) is SubsetRandomSampler:
                    raise TypeError(
                        "SkipMaskedSamples cannot shard a SubsetRandomSampler over processes. Under DDP, wrap the "
                        "subset as a dataset (torch.utils.data.Subset) and use shuffle=True."
                    )
                # What Lightning would inject for training: a shuffling DistributedSampler seeded
                # with the global seed.
                kwargs = trainer.distributed_sampler_kwargs or {}
                shards = {
                    "num_replicas": kwargs.get("num_replicas", 1),
                    "rank": kwargs.get("rank", 0),
                    "shuffle": True,
                    "seed": int(os.getenv("PL_GLOBAL_SEED", 0)),
                    "drop_last": False,
                }
        else:
            raise TypeError(
                f"SkipMaskedSamples cannot follow the order of a {type(base).__name__}: it supports the samplers "
                "of DataLoader(shuffle=True/False), SubsetRandomSampler and DistributedSampler, which visit each "
                "sample once per epoch. Use one of those (a weighted or repeating sampler has no 'last visit')."
            )
        self._population = population
        self._shards = shards
        self._base = base
        # A loader with a state (torchdata's StatefulDataLoader) is restored by Lightning on a
        # resume and skips the batches it had yielded itself: the sampler then starts the epoch
        # from its first index instead of the resumed batch.
        self._loader_skips = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
        self._batch_size = int(loader.batch_sampler.batch_size)
        self._drop_last = bool(loader.batch_sampler.drop_last)
        sampler = _LiveSampler(dataset, self, shards["num_replicas"] if shards else 1, shards["rank"] if shards else 0)
        return _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)

    def _current_epoch(self, trainer: pl.Trainer) -> int:
        # The epoch Lightning passes to set_epoch: still right while `len()` is read on a resume.
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def _replicas(self) -> int:
        return self._shards["num_replicas"] if self._shards else 1

    def _population_size(self) -> int:
        if self._n is None:
            return 0
        return self._n if self._population is None else int(self._population.sum())

    def _is_final_epoch(self, trainer: pl.Trainer, epoch: int) -> bool:
        if self.full_data_epochs == 0:
            return False
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and epoch >= max_epochs - self.full_data_epochs:
            return True
        if trainer.max_steps is not None and trainer.max_steps > 0:
            full = self._batches_for(self._per_process(self._population_size()))
            steps_per_epoch = math.ceil(full / max(1, trainer.accumulate_grad_batches))
            return trainer.max_steps - trainer.global_step <= self.full_data_epochs * steps_per_epoch
        return False

    def _plan(self, epoch: int) -> None:
        """Fix the live set of ``epoch`` (idempotent)."""
        if self._epoch is not None:
            # Epochs only move forward in a fit. An earlier one is asked for when the loader's
            # length is read (estimated_stepping_batches in configure_optimizers) before a resume
            # has restored the loop's progress: the restored epoch is the one meant.
            epoch = max(epoch, self._epoch)
        if self._epoch == epoch and self._live is not None:
            return
        if self._epoch is not None and self._epoch < epoch and self._live is not None:
            # The previous epoch ended without on_train_epoch_end (a resume past a checkpoint
            # taken after its last batch): apply its flags, collected from every process then.
            self._finish_epoch(reduce=False)
        trainer = self._trainer
        assert trainer is not None and self._next_live is not None
        if self.max_rest == 0 or self._is_final_epoch(trainer, epoch):
            live = torch.ones(self._n, dtype=torch.bool) if self._population is None else self._population.clone()
        else:
            seed = self._shards["seed"] if self._shards else 0
            tie_break = torch.randperm(self._n, generator=torch.Generator().manual_seed(seed + epoch))
            live = live_samples(
                self._next_live,
                epoch,
                population=self._population,
                min_live=min(self._population_size(), self._replicas() * self._batch_size),
                tie_break=tie_break,
            )
        self._epoch, self._live = epoch, live
        self._order = None
        self._batches_done = self._resume_batches = 0
        self._pending = []

    def _sampler_length(self) -> int:
        """Indices this process's sampler yields in the current epoch (a resumed epoch counts whole)."""
        assert self._trainer is not None
        self._plan(self._current_epoch(self._trainer))
        live = int(self._live.sum())
        replicas = self._replicas()
        if replicas == 1:
            return live
        return live // replicas if self._drop_last_shards() else math.ceil(live / replicas)

    def _drop_last_shards(self) -> bool:
        return bool(self._shards and self._shards["drop_last"])

    def _sampler_indices(self) -> list[int]:
        """This process's live indices for the current epoch, from the resumed batch on."""
        assert self._trainer is not None
        self._plan(self._current_epoch(self._trainer))
        if self._order is None:
            # Drawn once per epoch: a loader that makes its iterator twice (torchdata's
            # StatefulDataLoader does on a resume) gets the same order both times.
            base = self._base_order()
            self._order = base[self._live[base]]
        shards = self._shards
        if shards and shards["num_replicas"] > 1:
            stream = shard_indices(self._order, shards["num_replicas"], shards["rank"], shards["drop_last"])
        else:
            stream = self._order
        self._stream = stream
        start = 0 if self._loader_skips else self._resume_batches * self._batch_size
        self._resume_batches = 0
        return stream[start:].tolist()

    def _base_order(self) -> Tensor:
        """Every sample of the epoch in the order the original sampler gives (before sharding)."""
        shards = self._shards
        if shards is None:
            return torch.as_tensor(list(iter(self._base)), dtype=torch.long)
        if shards["shuffle"]:
            generator = torch.Generator().manual_seed(shards["seed"] + self._epoch)
            return torch.randperm(self._n, generator=generator)
        return torch.arange(self._n)

    def _batches_for(self, samples_per_process: int) -> int:
        if self._drop_last:
            return samples_per_process // self._batch_size
        return math.ceil(samples_per_process / self._batch_size)

    def _limit(self, trainer: pl.Trainer, batches: int) -> int:
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            return min(batches, limit)
        if limit >= 1.0 or batches == 0:
            return batches
        return max(1, int(batches * limit))

    def _epoch_length(self, trainer: pl.Trainer) -> int:
        """Batches of the current epoch on this process, after ``limit_train_batches``."""
        return self._limit(trainer, self._batches_for(self._sampler_length()))

    def _set_epoch_length(self, trainer: pl.Trainer) -> None:
        """Tell the fit loop how many batches the current epoch has (Lightning reads it once per loader)."""
        loop = trainer.fit_loop
        combined = loop._combined_loader
        if combined is None:
            return
        batches = self._epoch_length(trainer)
        combined.limits = [batches]
        loop.max_batches = batches
        interval = trainer.val_check_interval
        if getattr(trainer, "_val_check_time_interval", None) is None and isinstance(interval, float):
            trainer.val_check_batch = max(1, int(batches * interval))

    def _batch_indices(self, batch_idx: int) -> Tensor:
        stream = self._stream
        if stream is None:
            raise RuntimeError(
                "SkipMaskedSamples saw a training batch that did not come from its sampler; was the training "
                "DataLoader replaced after the fit started?"
            )
        size = self._batch_size
        return stream[batch_idx * size : (batch_idx + 1) * size]

    # -- per-epoch bookkeeping ---------------------------------------------------------------
    def _fold_pending(self) -> None:
        """Add the flags collected since the last call to the epoch's counts, summed over processes."""
        pending, self._pending = self._pending, []
        if any(flags.is_pinned() for _, flags in pending) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the one wait for the non-blocking copies
        local = torch.zeros(2, self._n, dtype=torch.int32)
        for indices, flags in pending:
            local[0].index_add_(0, indices, torch.ones(indices.numel(), dtype=torch.int32))
            local[1].index_add_(0, indices, flags.to(torch.int32))
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Every process reaches this point together (epoch end, checkpoint), so the
            # collective cannot deadlock; afterwards all hold the same counts.
            device = trainer.strategy.root_device
            local = trainer.strategy.reduce(local.to(device), reduce_op="sum").to("cpu", torch.int32)
        self._visits += local[0]
        self._masked_visits += local[1]

    def _finish_epoch(self, reduce: bool = True) -> dict[str, Any]:
        """Apply the epoch's flags to the schedule; returns the epoch's record."""
        if reduce:
            self._fold_pending()
        epoch = self._epoch
        visited = self._visits > 0
        # Masked at their previous visit, hence rested since (with max_rest > 0).
        came_back = visited & (self._streak > 0) if self.max_rest > 0 else torch.zeros_like(visited)
        masked = visited & (self._masked_visits == self._visits)
        self._streak, self._next_live = update_rest_schedule(
            self._streak, self._next_live, self._visits, self._masked_visits, epoch, self.max_rest
        )
        population = self._population_size()
        live = int(self._live.sum())
        full_batches = self._limit(self._trainer, self._batches_for(self._per_process(population)))
        record = {
            "epoch": epoch,
            "live": live,
            "resting": population - live,
            "batches": self._batches_done,
            "full_batches": full_batches,
            "returned": int(came_back.sum()),
            "returned_unmasked": int((came_back & ~masked).sum()),
        }
        self._history.append(record)
        self._visits.zero_()
        self._masked_visits.zero_()
        self._live = None
        return record

    def _per_process(self, samples: int) -> int:
        replicas = self._replicas()
        if replicas == 1:
            return samples
        return samples // replicas if self._drop_last_shards() else math.ceil(samples / replicas)

    def _reset_state(self) -> None:
        self._n: int | None = None
        self._streak: Tensor | None = None
        self._next_live: Tensor | None = None
        self._visits: Tensor | None = None
        self._masked_visits: Tensor | None = None
        self._population: Tensor | None = None
        self._shards: dict[str, Any] | None = None
        self._base: Any = None
        self._batch_size = 1
        self._drop_last = False
        self._loader_skips = False
        self._epoch: int | None = None
        self._live: Tensor | None = None
        self._order: Tensor | None = None
        self._stream: Tensor | None = None
        self._batches_done = 0
        self._resume_batches = 0
        self._length_pending = False
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._history: list[dict[str, Any]] = []


class _LiveSampler(DistributedSampler):
    """Yields the live sample indices of the current epoch, as planned by ``SkipMaskedSamples``.

    A ``DistributedSampler`` so that Lightning leaves it in place under DDP: it shards itself.
    """

    def __init__(self, dataset: Any, owner: SkipMaskedSamples, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self._owner = owner

    def __len__(self) -> int:
        return self._owner._sampler_length()

    def __iter__(self) -> Iterator[int]:
        return iter(self._owner._sampler_indices())
