"""``SkipMaskedSamples``: the rest schedule, the batches it leaves out, and Lightning's loop around it.

The schedule is checked against hand-built sequences of masked flags (a scripted module returns
them), never against the callback's own bookkeeping; sharding against torch's
``DistributedSampler``; per-sample flags against the slow reference loss; and a run without
anything to skip against a run without the callback, batch for batch and weight for weight.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import TinyClassifier, XYSteps, blobs, trainer
from reference import reference_as_softmax, reference_multilabel
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from lightning_assoftmax import (
    AdaptiveGradAccumulation,
    ASSoftmaxMixin,
    DeltaWarmup,
    SkipMaskedSamples,
)
from lightning_assoftmax.functional.sample_rest import (
    live_samples,
    rest_epochs,
    shard_indices,
    update_rest_schedule,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
]


# -- the schedule, as pure functions ------------------------------------------------------------------
def test_rest_doubles_with_consecutive_masked_visits_up_to_the_cap():
    assert rest_epochs(torch.tensor([0, 1, 2, 3, 4, 5, 100]), max_rest=4).tolist() == [0, 1, 2, 4, 4, 4, 4]
    assert rest_epochs(torch.tensor([1, 2, 3, 4, 5]), max_rest=8).tolist() == [1, 2, 4, 8, 8]
    assert rest_epochs(torch.tensor([1, 2, 3]), max_rest=3).tolist() == [1, 2, 3]


def test_schedule_update_by_hand():
    # sample:              0  1  2  3  4
    streak = torch.tensor([0, 2, 1, 3, 0])
    next_live = torch.tensor([0, 5, 0, 7, 4])
    visits = torch.tensor([1, 0, 1, 2, 2])  # 1 not visited; 3 and 4 drawn twice (DDP padding)
    masked = torch.tensor([1, 0, 0, 2, 1])  # 4 masked at only one of its two visits
    got_streak, got_next = update_rest_schedule(streak, next_live, visits, masked, epoch=3, max_rest=4)
    # 0: first masked visit -> rests 1 epoch (4), live from 5; 1: untouched; 2: unmasked -> live
    # next epoch; 3: fourth masked visit -> rest min(8, 4) = 4; 4: not masked at every visit.
    assert got_streak.tolist() == [1, 2, 0, 4, 0]
    assert got_next.tolist() == [5, 5, 4, 8, 4]


def test_live_set_wakes_the_samples_due_soonest_when_too_few_are_live():
    next_live = torch.tensor([9, 4, 6, 4, 12, 2])
    assert live_samples(next_live, 3).tolist() == [False, False, False, False, False, True]
    woken = live_samples(next_live, 3, min_live=4)
    assert woken.tolist() == [False, True, True, True, False, True]  # due at 2, 4, 4, 6
    # ties in the due epoch are broken by the tie-break key (ascending)
    tie = torch.tensor([0, 5, 0, 1, 0, 0])
    assert live_samples(next_live, 3, min_live=2, tie_break=tie).tolist() == [False, False, False, True, False, True]
    population = torch.tensor([True, True, False, True, True, True])
    assert live_samples(next_live, 3, population=population, min_live=4).tolist() == [True, True, False, True, False, True]


@pytest.mark.parametrize("n", [1, 7, 8, 13])
@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_matches_torch_distributed_sampler(n, replicas, drop_last):
    if drop_last and n < replicas:
        return
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n + replicas))
    for rank in range(replicas):
        sampler = DistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=False, drop_last=drop_last)
        want = [int(order[i]) for i in sampler]
        assert shard_indices(order, replicas, rank, drop_last).tolist() == want


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="max_rest must be >= 0"):
        SkipMaskedSamples(max_rest=-1)
    with pytest.raises(TypeError, match="full_data_epochs must be an integer"):
        SkipMaskedSamples(full_data_epochs=1.5)


# -- the batches a fit runs: scripted masked flags --------------------------------------------------------
def indexed_data(n: int) -> TensorDataset:
    """Sample i is the feature vector (i, 1) with target 0; the third field is its index."""
    idx = torch.arange(n)
    return TensorDataset(torch.stack([idx.float(), torch.ones(n)], dim=1), torch.zeros(n, dtype=torch.long), idx)


class Scripted(L.LightningModule):
    """Reports the masked flags ``script(epoch, index)``; records the indices of every batch."""

    def __init__(self, script):
        super().__init__()
        self.script = script
        self.net = nn.Linear(2, 2)
        self.batches: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        epoch = self.trainer.current_epoch
        self.batches.append((epoch, idx.tolist()))
        flags = torch.tensor([self.script(epoch, int(i)) for i in idx], dtype=torch.bool)
        loss = nn.functional.cross_entropy(self.net(x), y)
        return {"loss": loss, "masked_samples": flags}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def seen(self, epoch: int) -> list[int]:
        return sorted(i for e, batch in self.batches if e == epoch for i in batch)


def fit_scripted(script, n, epochs, callback=None, batch_size=2, shuffle=True, **trainer_kwargs):
    model = Scripted(script)
    callbacks = [callback] if callback is not None else []
    trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs).fit(
        model, DataLoader(indexed_data(n), batch_size=batch_size, shuffle=shuffle)
    )
    return model


def test_the_samples_left_out_are_exactly_those_the_rule_says():
    # Hand-built masked flags (max_rest=2, the last of 9 epochs uses every sample):
    #   sample 0 is masked at every visit: visits 0, rests 1, visit 2, rests 3-4 (2 epochs),
    #     visit 5, rests 6-7, visit 8 (final epoch);
    #   sample 1 is masked at epoch 0 only: rests 1, comes back at 2 unmasked, then every epoch;
    #   sample 2 is unmasked at 0, masked from epoch 1 on: visits 0, 1, rests 2, visit 3, rests
    #     4-5, visit 6, rests 7, visit 8 (final);
    #   sample 3 is masked at epochs 0 and 2 only: rests 1, visit 2, rests 3-4, comes back at 5
    #     unmasked, then every epoch;
    #   samples 4-11 are never masked.
    masked = {0: lambda e: True, 1: lambda e: e == 0, 2: lambda e: e >= 1, 3: lambda e: e in (0, 2)}
    resting = {0: {1, 3, 4, 6, 7}, 1: {1}, 2: {2, 4, 5, 7}, 3: {1, 3, 4}}
    n, epochs = 12, 9
    model = fit_scripted(lambda e, i: masked.get(i, lambda e: False)(e), n, epochs, SkipMaskedSamples(max_rest=2))
    for epoch in range(epochs):
        want = sorted(i for i in range(n) if epoch not in resting.get(i, set()))
        assert model.seen(epoch) == want, f"epoch {epoch}"
        sizes = [len(b) for e, b in model.batches if e == epoch]
        assert all(size == 2 for size in sizes[:-1]), "batches stay full"
    assert model.seen(epochs - 1) == list(range(n)), "every sample is seen in the final full-data epoch"


@pytest.mark.slow
def test_worker_processes_keep_the_batches_in_order():
    script = lambda e, i: i % 4 != 1  # noqa: E731
    model = Scripted(script)
    loader = DataLoader(indexed_data(24), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    trainer(max_epochs=3, callbacks=[SkipMaskedSamples(max_rest=2)]).fit(model, loader)
    assert model.seen(0) == list(range(24))
    assert model.seen(1) == [i for i in range(24) if i % 4 == 1]
    assert model.seen(2) == list(range(24))


def test_summary_counts_batches_and_resting_samples():
    callback = SkipMaskedSamples(max_rest=2)
    model = fit_scripted(lambda e, i: i < 4, 12, 4, callback)
    info = callback.summary()
    per_epoch = [sum(1 for e, _ in model.batches if e == epoch) for epoch in range(4)]
    assert [r["batches"] for r in info["epochs"]] == per_epoch
    assert info["batches_run"] == sum(per_epoch) and info["full_batches"] == 4 * 6
    # samples 0-3 masked at every visit: they rest in epoch 1, come back in 2, rest again in 3,
    # but 3 is the final epoch and uses every sample
    assert [r["resting"] for r in info["epochs"]] == [0, 4, 0, 0]
    assert info["epochs"][2]["returned"] == 4 and info["epochs"][2]["returned_unmasked"] == 0


def test_an_epoch_in_which_every_sample_would_rest_still_runs_one_full_batch():
    callback = SkipMaskedSamples(max_rest=4, full_data_epochs=0)
    model = fit_scripted(lambda e, i: True, 6, 3, callback)
    assert model.seen(0) == list(range(6))
    first = model.seen(1)
    assert len(first) == 2 and sum(1 for e, _ in model.batches if e == 1) == 1
    # the two woken early were masked again and rest 2 epochs; the other four were due at 2
    assert model.seen(2) == sorted(set(range(6)) - set(first))


@pytest.mark.parametrize("drop_last", [False, True])
def test_drop_last_and_a_batch_limit(drop_last):
    model = Scripted(lambda e, i: i % 3 == 0)
    loader = DataLoader(indexed_data(21), batch_size=4, shuffle=True, drop_last=drop_last)
    trainer(max_epochs=4, limit_train_batches=4, callbacks=[SkipMaskedSamples()]).fit(model, loader)
    for epoch in range(4):
        sizes = [len(b) for e, b in model.batches if e == epoch]
        assert len(sizes) <= 4
        if drop_last:
            assert all(size == 4 for size in sizes)


def test_a_sample_that_becomes_unmasked_returns_every_epoch():
    callback = SkipMaskedSamples(max_rest=8, full_data_epochs=0)
    # sample 5 is masked at its first two visits (epoch 0, rest 1; epoch 2, rest 2), then
    # found unmasked at its visit in epoch 5
    model = fit_scripted(lambda e, i: i == 5 and e < 3, 10, 8, callback)
    visits = [e for e in range(8) if 5 in model.seen(e)]
    assert visits == [0, 2, 5, 6, 7]


# -- nothing to skip: the run is the run without the callback ---------------------------------------------
class DropoutClassifier(XYSteps, ASSoftmaxMixin, L.LightningModule):
    """Dropout draws from the global random state, as does DataLoader(shuffle=True): any extra or
    missing draw would change the batches or the weights."""

    def __init__(self, delta: float):
        super().__init__(delta=delta)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


class BatchRecorder(L.Callback):
    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].clone())


def fit_dropout(delta: float, callback=None, epochs: int = 5, **loader_kwargs):
    L.seed_everything(7, verbose=False)
    model = DropoutClassifier(delta)
    recorder = BatchRecorder()
    callbacks = [recorder] + ([callback] if callback is not None else [])
    loader = DataLoader(blobs(90), batch_size=16, **loader_kwargs)
    trainer(max_epochs=epochs, callbacks=callbacks).fit(model, loader)
    return model, recorder.batches


@pytest.mark.parametrize(
    ("delta", "callback", "loader_kwargs"),
    [
        (1.0, lambda: SkipMaskedSamples(), {"shuffle": True}),  # nothing is ever masked
        (0.1, lambda: SkipMaskedSamples(max_rest=0), {"shuffle": True}),  # the rule disabled
        (0.1, lambda: SkipMaskedSamples(max_rest=0), {"shuffle": False}),
        (1.0, lambda: SkipMaskedSamples(), {"sampler": SubsetRandomSampler(range(10, 80))}),
    ],
)
def test_with_nothing_to_skip_the_run_is_identical_to_one_without_the_callback(delta, callback, loader_kwargs):
    plain_model, plain_batches = fit_dropout(delta, **loader_kwargs)
    model, batches = fit_dropout(delta, callback(), **loader_kwargs)
    assert len(batches) == len(plain_batches)
    for got, want in zip(batches, plain_batches, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(got, want)


def test_with_samples_masked_the_callback_runs_fewer_batches():
    _, plain_batches = fit_dropout(0.1, shuffle=True, epochs=6)
    callback = SkipMaskedSamples()
    model, batches = fit_dropout(0.1, callback, shuffle=True, epochs=6)
    assert len(batches) < len(plain_batches) * 0.8
    assert callback.summary()["batches_run"] == len(batches)
    assert callback.summary()["full_batches"] == len(plain_batches)


# -- per-sample flags from the mixin -----------------------------------------------------------------------
class FixedLogits(ASSoftmaxMixin, L.LightningModule):
    """Training "predicts" stored logits, looked up by the batch's sample indices."""

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False):
        super().__init__(delta=0.1, multilabel=multilabel)
        self.logits = nn.Parameter(logits.clone())
        self.targets = targets
        self.flags: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        loss = self.as_softmax_loss(self.logits[idx], self.targets[idx])
        self.flags.append((idx.clone(), self.as_softmax_last_masked_samples.clone()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def run_fixed(logits, targets, multilabel=False):
    model = FixedLogits(logits, targets, multilabel)
    trainer(max_epochs=1, callbacks=[SkipMaskedSamples()]).fit(
        model, DataLoader(TensorDataset(torch.arange(len(logits))), batch_size=4)
    )
    idx = torch.cat([i for i, _ in model.flags])
    flags = torch.cat([f for _, f in model.flags])
    return flags[torch.argsort(idx)]


def test_token_level_sample_is_masked_when_all_its_non_ignored_positions_are():
    gen = torch.Generator().manual_seed(0)
    n, classes, length = 12, 5, 6
    target = torch.randint(classes, (n, length), generator=gen)
    logits = torch.randn(n, classes, length, generator=gen)
    # confident rows for most positions, so that whole samples end up masked
    logits += 9.0 * nn.functional.one_hot(target, classes).permute(0, 2, 1) * (torch.rand(n, 1, length, generator=gen) < 0.9)
    target[torch.rand(n, length, generator=gen) < 0.25] = -100
    target[3] = -100  # a sample with every position ignored has no gradient: it counts as masked
    rows = reference_as_softmax(logits, target, 0.1, reduction="none")
    want = ((rows == 0) | (target == -100)).all(dim=1)
    assert 0 < int(want.sum()) < n
    assert run_fixed(logits, target).tolist() == want.tolist()


def test_multilabel_sample_is_masked_when_its_loss_is_zero():
    gen = torch.Generator().manual_seed(1)
    target = (torch.rand(10, 6, generator=gen) < 0.3).float()
    logits = torch.randn(10, 6, generator=gen) + 12.0 * (2 * target - 1) * (torch.rand(10, 1, generator=gen) < 0.6)
    want = reference_multilabel(logits, target, 0.1) == 0
    assert 0 < int(want.sum()) < 10
    assert run_fixed(logits, target, multilabel=True).tolist() == want.tolist()


def test_losses_that_cannot_zero_a_sample_rest_nothing():
    model = TinyClassifier(loss="softmax")
    callback = SkipMaskedSamples()
    trainer(max_epochs=4, callbacks=[callback]).fit(model, DataLoader(blobs(64), batch_size=16, shuffle=True))
    assert callback.summary()["batches_run"] == callback.summary()["full_batches"] == 16


def test_missing_flags_warn_and_rest_nothing():
    class NoFlags(Scripted):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    callback = SkipMaskedSamples()
    model = NoFlags(lambda e, i: True)
    with pytest.warns(UserWarning, match="reported no per-sample masked flags"):
        trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(indexed_data(8), batch_size=2))
    assert [model.seen(e) for e in range(3)] == [list(range(8))] * 3


def test_flags_of_the_wrong_shape_fail_clearly():
    class WrongShape(Scripted):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return {"loss": out["loss"], "masked_samples": out["masked_samples"][:1]}

    with pytest.raises(RuntimeError, match="holds 2 samples but its masked flags have shape"):
        trainer(max_epochs=1, callbacks=[SkipMaskedSamples()]).fit(
            WrongShape(lambda e, i: True), DataLoader(indexed_data(8), batch_size=2)
        )


# -- configurations it refuses -------------------------------------------------------------------------------
class Stream(IterableDataset):
    def __iter__(self):
        yield from indexed_data(8)


@pytest.mark.parametrize(
    ("make_loader", "match"),
    [
        (lambda ds: DataLoader(ds, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8)), "cannot follow the order of a WeightedRandomSampler"),
        (lambda ds: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 2, False)), "instead of a batch_sampler"),
        (lambda ds: DataLoader(ds, batch_size=2, sampler=RandomSampler(ds, replacement=True)), "drawn once per epoch"),
        (lambda ds: DataLoader(ds, batch_size=None), "own batching"),
        (lambda ds: DataLoader(Stream(), batch_size=2), "map-style dataset"),
        (lambda ds: [DataLoader(ds, batch_size=2), DataLoader(ds, batch_size=2)], "one torch DataLoader"),
    ],
)
def test_unsupported_training_data_is_refused(make_loader, match):
    loader = make_loader(indexed_data(8))
    with pytest.raises((TypeError, ValueError), match=match):
        trainer(max_epochs=1, callbacks=[SkipMaskedSamples()]).fit(Scripted(lambda e, i: False), loader)


def test_custom_batch_sampler_and_overfit_batches_are_refused():
    class MyBatches(BatchSampler):
        pass

    loader = DataLoader(indexed_data(8), batch_sampler=MyBatches(range(8), 2, False))
    with pytest.raises(TypeError, match="own batching"):
        trainer(max_epochs=1, callbacks=[SkipMaskedSamples()]).fit(Scripted(lambda e, i: False), loader)
    with pytest.raises(ValueError, match="overfit_batches"):
        trainer(max_epochs=1, overfit_batches=2, callbacks=[SkipMaskedSamples()]).fit(
            Scripted(lambda e, i: False), DataLoader(indexed_data(8), batch_size=2)
        )


# -- Lightning's loop around shorter epochs ------------------------------------------------------------------
class LoopProbe(L.Callback):
    """Listed *before* the callback: what each epoch looked like from outside."""

    def __init__(self):
        self.totals: list[int] = []
        self.validations: list[int] = []
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.validations.append(0)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.totals.append(trainer.num_training_batches)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations[-1] += 1


class ScheduledTiny(TinyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def test_epoch_length_validation_and_epoch_schedulers_follow_the_shorter_epochs():
    L.seed_everything(0, verbose=False)
    probe, callback = LoopProbe(), SkipMaskedSamples()
    data = blobs(160)
    model = ScheduledTiny(lr=0.1)
    fit = trainer(max_epochs=6, val_check_interval=0.5, num_sanity_val_steps=0, callbacks=[probe, callback])
    fit.fit(model, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=64))
    run = [record["batches"] for record in callback.summary()["epochs"]]
    assert min(run) < 20 and run[0] == run[-1] == 20
    assert probe.totals == run
    # validation twice per epoch however long; the epoch scheduler stepped after every epoch
    assert probe.validations == [batches // max(1, int(batches * 0.5)) for batches in run]
    assert probe.lrs == pytest.approx([0.1 * 0.5**e for e in range(6)])


def test_max_steps_stops_on_time_and_places_the_final_full_epoch():
    L.seed_everything(0, verbose=False)
    callback = SkipMaskedSamples(full_data_epochs=1)
    model = TinyClassifier(lr=0.1)
    fit = trainer(max_epochs=-1, max_steps=40, callbacks=[callback])
    fit.fit(model, DataLoader(blobs(96), batch_size=8, shuffle=True))
    assert fit.global_step == 40
    records = callback.summary()["epochs"]
    assert any(r["resting"] > 0 for r in records)
    # from the epoch whose start left at most one full epoch (12 steps) to go, every sample
    steps_before = [sum(r["batches"] for r in records[:i]) for i in range(len(records))]
    for record, done in zip(records, steps_before, strict=True):
        if 40 - done <= 12:
            assert record["resting"] == 0


def test_reloading_the_dataloader_every_epoch_keeps_the_schedule():
    scripts = lambda e, i: i < 6  # noqa: E731
    plain = fit_scripted(scripts, 12, 4, SkipMaskedSamples(), shuffle=False)
    reloaded = fit_scripted(scripts, 12, 4, SkipMaskedSamples(), shuffle=False, reload_dataloaders_every_n_epochs=1)
    assert reloaded.batches == plain.batches
    assert plain.seen(1) == list(range(6, 12))


def test_it_composes_with_adaptive_grad_accumulation_and_delta_warmup():
    L.seed_everything(0, verbose=False)
    accumulation, skipping = AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=3), SkipMaskedSamples()
    model = TinyClassifier(lr=0.1)
    fit = trainer(max_epochs=6, callbacks=[DeltaWarmup(warmup_fraction=0.2), accumulation, skipping])
    fit.fit(model, DataLoader(blobs(160), batch_size=8, shuffle=True))
    steps = accumulation.summary()
    assert steps["plain_optimizer_steps"] == skipping.summary()["batches_run"] < skipping.summary()["full_batches"]
    assert steps["optimizer_steps"] == fit.global_step < steps["plain_optimizer_steps"]


def test_subset_datasets_and_sequential_order_are_supported():
    data = Subset(indexed_data(20), range(4, 16))
    model = Scripted(lambda e, i: i < 8)
    trainer(max_epochs=3, callbacks=[SkipMaskedSamples()]).fit(model, DataLoader(data, batch_size=3))
    assert model.seen(0) == list(range(4, 16))
    assert model.seen(1) == list(range(8, 16))
    assert len(model.batches[0][1]) == 3


# -- no host reads per batch ---------------------------------------------------------------------------------
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def test_the_per_batch_path_reads_no_tensor_value_on_the_host(monkeypatch):
    """On a GPU a host read (``.item()``, ``int(t)``, ``if t:``) waits for the device at every batch.
    Without one, the Tensor methods that perform them are wrapped while the callback's per-batch
    hooks and the mixin's flag recording run (the loss op they call is not watched)."""
    reads: list[str] = []
    state = {"depth": 0, "where": ""}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def recording(tensor, *args, _name=name, _original=original, **kwargs):
            if state["depth"]:
                reads.append(f"{state['where']}: {_name}")
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)

    def watched(owner, name, depth):
        original = getattr(owner, name)

        def run(*args, **kwargs):
            outer = state["depth"], state["where"]
            state["depth"], state["where"] = depth, name
            try:
                return original(*args, **kwargs)
            finally:
                state["depth"], state["where"] = outer

        monkeypatch.setattr(owner, name, run)

    for hook in ("on_train_batch_start", "on_train_batch_end"):
        watched(SkipMaskedSamples, hook, 1)
    watched(TinyClassifier, "_as_softmax_record_masked_samples", 1)
    criterion = TinyClassifier().as_softmax_criterion
    watched(type(criterion), "forward", 0)  # the loss op itself: not the glue's business
    callback = SkipMaskedSamples()
    trainer(max_epochs=4, callbacks=[callback]).fit(TinyClassifier(lr=0.1), DataLoader(blobs(96), batch_size=8, shuffle=True))
    assert callback.summary()["batches_run"] < callback.summary()["full_batches"]
    assert reads == []


class FixedHidden(ASSoftmaxMixin, L.LightningModule):
    """Training feeds stored hidden states to an output head (lightning_assoftmax.heads)."""

    def __init__(self, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module):
        super().__init__(delta=0.1)
        self.hidden = nn.Parameter(hidden.clone())
        self.targets = targets
        self.head = head
        self.flags: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        if isinstance(self.head, nn.Linear):  # the fused output layer
            loss = self.as_softmax_linear_loss(self.hidden[idx], self.head.weight, self.targets[idx], self.head.bias)
        else:
            loss = self.as_softmax_head_loss(self.head, self.hidden[idx], self.targets[idx])
        self.flags.append((idx.clone(), self.as_softmax_last_masked_samples.clone()))
        self.losses.append((idx.clone(), loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _mixed_targets(scores: torch.Tensor) -> torch.Tensor:
    """The argmax of ``scores`` (confident rows end up masked), a random class in every third row,
    and one ignored position."""
    targets = scores.argmax(dim=1)
    targets[::3] = torch.randint(scores.shape[1], (len(targets[::3]),))
    targets[5] = -100
    return targets


def _fit_recording(hidden, targets, output):
    """One epoch of ``FixedHidden`` under ``SkipMaskedSamples`` (batches of 4): the per-sample
    flags in sample order, and the model (its ``losses``: batch indices and loss of each step)."""
    model = FixedHidden(hidden, targets, output)
    trainer(max_epochs=1, callbacks=[SkipMaskedSamples()]).fit(
        model, DataLoader(TensorDataset(torch.arange(len(targets))), batch_size=4)
    )
    idx = torch.cat([i for i, _ in model.flags])
    flags = torch.cat([f for _, f in model.flags])[torch.argsort(idx)]
    return flags, model


def test_head_loss_gives_the_flags_of_the_exact_distribution():
    """With an output head, a sample is flagged when AS-Softmax of the head's exact distribution
    (as_softmax_cross_entropy of log_prob, the reference) is zero; the mean loss is unchanged."""
    from lightning_assoftmax.heads import build_head

    torch.manual_seed(0)
    n, width, classes = 24, 8, 12
    head = build_head("class_based", width, classes, num_clusters=3)
    hidden = 4.0 * torch.randn(n, width)
    with torch.no_grad():
        targets = _mixed_targets(head.log_prob(hidden))
        want = reference_as_softmax(head.log_prob(hidden), targets, 0.1, reduction="none") == 0
    assert 0 < int(want.sum()) < n
    flags, model = _fit_recording(hidden, targets, head)
    assert flags.tolist() == want.tolist()
    for batch_idx, loss in model.losses:
        with torch.no_grad():
            expected = head.loss(hidden[batch_idx], targets[batch_idx], delta=0.1)
        torch.testing.assert_close(loss, expected)


def test_fused_linear_loss_gives_the_flags_of_its_logits():
    """as_softmax_linear_loss under SkipMaskedSamples: the flags of AS-Softmax on the layer's full
    logits (the reference), and the mean loss of the fused layer."""
    from lightning_assoftmax.functional import linear_as_softmax_cross_entropy

    torch.manual_seed(1)
    n, width, classes = 24, 8, 12
    layer = nn.Linear(width, classes)
    hidden = 4.0 * torch.randn(n, width)
    with torch.no_grad():
        targets = _mixed_targets(layer(hidden))
        want = reference_as_softmax(layer(hidden), targets, 0.1, reduction="none") == 0
    assert 0 < int(want.sum()) < n
    flags, model = _fit_recording(hidden, targets, layer)
    assert flags.tolist() == want.tolist()
    for batch_idx, loss in model.losses:
        with torch.no_grad():
            expected = linear_as_softmax_cross_entropy(
                hidden[batch_idx], layer.weight, targets[batch_idx], layer.bias, 0.1
            )
        torch.testing.assert_close(loss, expected)
