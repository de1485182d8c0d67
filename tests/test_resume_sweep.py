"""The resume sweep: a fit resumed from any of its checkpoints continues as the uninterrupted one.

A small run (a tiny model, 5 epochs of up to 7 batches of 4, windows of up to 3 micro-batches, so
an epoch's last window is short) saves a checkpoint at every optimizer step
(``ModelCheckpoint(every_n_train_steps=1)``), at every epoch end
(``ModelCheckpoint(every_n_epochs=1)``) and, with ``AdaptiveGradAccumulation``, after every batch
that ends inside a window (such a checkpoint holds the window's gradients). Each checkpoint is resumed in a fresh Trainer with fresh objects (other
initial weights, other seed), and the continuation is compared with an uninterrupted fit that saves
nothing:

- the batches: epoch, batch index and sample indices of every batch;
- the accumulation windows: the window size each batch ran under and the optimizer step count after
  it (so which batches each step covered); the training delta of each batch where ``DeltaWarmup``
  is in the Trainer;
- the final weights, bit for bit, and the callbacks' summaries (optimizer steps and window sizes;
  batches, live and resting samples per epoch).

Configurations: ``AdaptiveGradAccumulation`` alone (on a resumable loader), ``SkipMaskedSamples``
alone (on a ``DataLoader``, and on torchdata's ``StatefulDataLoader``, which Lightning restores to
its position in the epoch), both together with ``DeltaWarmup``, and (slow) both with ``DeltaWarmup``, validation twice
per epoch, ``LossAccuracyCorrelation`` and checkpoints at the end of each validation run.

One limitation holds for every Lightning run and is asserted so that it stays documented: a
checkpoint taken after a batch that a validation run follows (a step checkpoint; at an epoch's end
or at a mid-epoch ``val_check_interval``) resumes past that validation run: Lightning skips it, so
the correlation history lacks that one run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import EpochSeededLoader
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_assoftmax import (
    AdaptiveGradAccumulation,
    ASSoftmaxMixin,
    DeltaWarmup,
    LossAccuracyCorrelation,
    SkipMaskedSamples,
)

_needs_torchdata = pytest.mark.skipif(
    importlib.util.find_spec("torchdata") is None, reason="torchdata (StatefulDataLoader) is not installed"
)
N_FEATURES, N_CLASSES = 8, 4
# 28 samples in batches of 4: 7 batches per full epoch; windows of 2 and 3 leave a short last one.
N_TRAIN, N_VAL, BATCH, EPOCHS = 28, 16, 4, 5
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


def cluster_data(n: int, seed: int) -> TensorDataset:
    """Overlapping clusters: many samples become masked (they rest, windows grow), not all."""
    centers = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(1234)) * 1.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return TensorDataset(centers[y] + 0.6 * torch.randn(n, N_FEATURES, generator=g), y, torch.arange(n))


class Classifier(ASSoftmaxMixin, L.LightningModule):
    """Batches ``(x, y, sample index)``; momentum and a per-step LR schedule, which a resume must
    restore too."""

    def __init__(self, init_seed: int = 0):
        super().__init__(delta=0.1)
        torch.manual_seed(init_seed)
        self.net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.Tanh(), nn.Linear(16, N_CLASSES))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return self.as_softmax_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.as_softmax_loss(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.5)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.98)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class BatchLog(L.Callback):
    """Listed after the bundle. One row per training batch: ``(epoch, batch_idx, sample indices,
    window size, training delta, optimizer steps after the batch)``. Its checkpoint state is the
    number of rows before it, so that a resumed log lines up with the uninterrupted one."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.offset = 0
        self.validated_after: list[int] = []  # rows before each validation run
        self._open: tuple | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        indices = tuple(batch[2].tolist())
        self._open = (trainer.current_epoch, batch_idx, indices, trainer.accumulate_grad_batches, pl_module.as_softmax_delta)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((*self._open, trainer.global_step))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated_after.append(self.offset + len(self.rows))

    def state_dict(self):
        return {"rows_before": self.offset + len(self.rows)}

    def load_state_dict(self, state_dict):
        self.offset = state_dict["rows_before"]


class SaveInsideWindows(L.Callback):
    """Listed after the bundle: saves after every batch that ends without an optimizer step."""

    def __init__(self, dirpath: Path):
        self.dirpath = dirpath
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._steps = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._steps:
            trainer.save_checkpoint(self.dirpath / f"inside-step={trainer.global_step}-batch={batch_idx}-epoch={trainer.current_epoch}.ckpt")


@dataclass(frozen=True)
class Config:
    name: str
    accumulation: bool = False
    skipping: bool = False
    warmup: bool = False
    validation: bool = False
    stateful: bool = False  # the training data through torchdata's StatefulDataLoader
    shuffle: bool = False  # with stateful: StatefulDataLoader(shuffle=True), a random order each epoch

    def callbacks(self) -> list[L.Callback]:
        callbacks: list[L.Callback] = []
        if self.accumulation:
            callbacks.append(AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=3))
        if self.skipping:
            callbacks.append(SkipMaskedSamples(max_rest=2))
        if self.warmup:
            callbacks.append(DeltaWarmup(warmup_fraction=0.5))
        if self.validation:
            callbacks.append(LossAccuracyCorrelation(save_figure=False, min_points=2))
        return callbacks


@dataclass
class Run:
    model: Classifier
    log: BatchLog
    callbacks: list[L.Callback] = field(default_factory=list)

    def correlation(self) -> LossAccuracyCorrelation | None:
        return next((c for c in self.callbacks if isinstance(c, LossAccuracyCorrelation)), None)


def fit(
    config: Config, *, save: Path | None = None, ckpt_path: Path | None = None, seed: int = 0, num_workers: int = 0,
    first: list[L.Callback] | None = None,
) -> Run:
    L.seed_everything(seed, verbose=False)
    model = Classifier(init_seed=seed)
    bundle, log = config.callbacks(), BatchLog()
    callbacks = [*(first or []), *bundle, log]
    if save is not None:
        if config.accumulation:
            callbacks.append(SaveInsideWindows(save))
        callbacks.append(ModelCheckpoint(dirpath=save, filename="{step}", every_n_train_steps=1, save_top_k=-1))
        callbacks.append(
            ModelCheckpoint(dirpath=save, filename="end-{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
        )
        if config.validation:
            # A distinct monitor gives it its own state key; it saves at the end of each validation run.
            callbacks.append(
                ModelCheckpoint(dirpath=save, filename="val-{epoch}-{step}", monitor="val/acc", mode="max",
                                every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=False)
            )
    data = cluster_data(N_TRAIN, seed=0)
    if config.stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

        if config.shuffle:
            train = StatefulDataLoader(data, batch_size=BATCH, shuffle=True, num_workers=num_workers)
        else:
            sampler = StatefulDistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5)
            train = StatefulDataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=num_workers)
    elif config.skipping:
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5)
        train = DataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=num_workers)
    else:
        # AdaptiveGradAccumulation alone resumes mid-epoch exactly only on a resumable loader.
        x, y, _ = data.tensors
        train = EpochSeededLoader(x, y, BATCH, seed=5, indices=True)
    val = DataLoader(cluster_data(N_VAL, seed=1), batch_size=N_VAL) if config.validation else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=save is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if config.validation else 0,
        # twice per epoch: checkpoints at a mid-epoch validation's end too (some inside a window)
        val_check_interval=0.5,
        deterministic=True,
        callbacks=callbacks,
    )
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return Run(model, log, bundle)


def windows(rows: list[tuple]) -> list[tuple[int, list[int]]]:
    """``(window size, [batch positions])`` of each optimizer step, from a full log."""
    out, batches, steps = [], [], 0
    for position, row in enumerate(rows):
        batches.append(position)
        if row[-1] > steps:
            out.append((row[3], batches))
            batches, steps = [], row[-1]
    assert not batches, "the run ends with an optimizer step"
    return out


def epoch_of(rows: list[tuple], position: int) -> int:
    return rows[position][0]


def epoch_lengths(rows: list[tuple]) -> list[int]:
    return [sum(1 for row in rows if row[0] == epoch) for epoch in range(EPOCHS)]


def last_batches(rows: list[tuple]) -> set[int]:
    """Positions (rows before) of the checkpoints taken after an epoch's last batch."""
    return {position + 1 for position, row in enumerate(rows) if position + 1 == len(rows) or rows[position + 1][0] != row[0]}


def assert_same_weights(got: nn.Module, want: nn.Module, where: str) -> None:
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{where}: {name}: {m}")


def assert_meaningful(config: Config, rows: list[tuple]) -> None:
    """The run holds the cases the sweep is about."""
    if config.accumulation:
        steps = windows(rows)
        assert max(k for k, _ in steps) == 3
        # a short last window (the epoch ended first) and windows that change size
        assert any(len(batches) < k for k, batches in steps)
        assert len({k for k, _ in steps}) == 3
    if config.skipping:
        lengths = epoch_lengths(rows)
        assert lengths[0] == lengths[-1] == 7 and min(lengths) < 7, lengths
        # an epoch whose last batch is followed by a longer epoch (the case of a truncated epoch)
        assert any(lengths[e + 1] > lengths[e] for e in range(EPOCHS - 1)), lengths


CONFIGS = [
    Config("accumulation", accumulation=True),
    Config("skipping", skipping=True),
    Config("both+warmup", accumulation=True, skipping=True, warmup=True),
    # the loader restores its own position on a resume and skips the batches it had yielded
    pytest.param(Config("skipping+StatefulDataLoader", skipping=True, stateful=True), marks=_needs_torchdata),
    pytest.param(Config("both+warmup+validation", accumulation=True, skipping=True, warmup=True, validation=True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_checkpoint_resumes_into_the_uninterrupted_run(tmp_path, config):
    full = fit(config)
    rows = full.log.rows
    assert_meaningful(config, rows)
    saving = fit(config, save=tmp_path)
    assert saving.log.rows == rows, "saving checkpoints changed the run"

    checkpoints = sorted(tmp_path.glob("*.ckpt"))
    kinds = {kind: [p for p in checkpoints if p.name.startswith(kind)] for kind in ("step", "end", "inside", "val")}
    assert len(kinds["step"]) == rows[-1][-1] and len(kinds["end"]) == EPOCHS
    assert bool(kinds["inside"]) == config.accumulation and bool(kinds["val"]) == config.validation
    at_last_batch = last_batches(rows)
    offsets = set()
    for path in checkpoints:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resumed = fit(config, ckpt_path=path, seed=123)
        where = f"{config.name}, resumed from {path.name}"
        offset = resumed.log.offset
        offsets.add(offset)
        assert resumed.log.rows == rows[offset:], where
        assert_same_weights(resumed.model, full.model, where)
        for got, want in zip(resumed.callbacks, full.callbacks, strict=True):
            if hasattr(want, "summary"):  # optimizer steps and window sizes; batches run per epoch
                assert got.summary() == want.summary(), where
        correlation = resumed.correlation()
        if correlation is not None:
            want = full.correlation().history
            if path.name.startswith(("step", "inside")) and offset in full.log.validated_after:
                # Saved after a batch and before the validation run that follows it: Lightning
                # resumes past that validation run.
                skipped = full.log.validated_after.index(offset)
                want = want[:skipped] + want[skipped + 1 :]
            assert correlation.history == want, where
    # every batch boundary at a step, inside a window or at an epoch's end was a resume point
    assert at_last_batch <= offsets
    assert {position + 1 for position, row in enumerate(rows) if row[-1] > (rows[position - 1][-1] if position else 0)} <= offsets


class ReadsTheLoaderLength(L.Callback):
    """Listed first: reads the training loader's length when training starts, as a progress bar
    or a schedule might, before ``SkipMaskedSamples`` sees the resumed epoch."""

    def on_train_start(self, trainer, pl_module):
        self.length = len(trainer.train_dataloader)


def test_resume_into_a_longer_epoch_with_a_worker_process(tmp_path):
    """A step checkpoint after an epoch's last batch, followed by a longer epoch, with the loader
    in a worker process, which draws the sampler's indices when the iterator is made (before the
    fit loop moves to the next epoch)."""
    config = Config("skipping", skipping=True)
    full = fit(config, num_workers=1)
    rows = full.log.rows
    assert_meaningful(config, rows)
    fit(config, save=tmp_path, num_workers=1)
    lengths = epoch_lengths(rows)
    # the step checkpoints at the last batch of an epoch followed by a longer one
    ends = [sum(lengths[: e + 1]) for e in range(EPOCHS - 1) if lengths[e + 1] > lengths[e]]
    for end in ends:
        step = rows[end - 1][-1]
        reader = ReadsTheLoaderLength()
        resumed = fit(config, ckpt_path=tmp_path / f"step={step}.ckpt", seed=123, num_workers=1, first=[reader])
        assert reader.length == lengths[epoch_of(rows, end)]
        assert resumed.log.offset == end
        assert resumed.log.rows == rows[end:]
        assert_same_weights(resumed.model, full.model, f"resumed after batch {end}")


# -- DDP: a checkpoint inside a window ---------------------------------------------------------------------
class SaveInsideFirstWindowOf2(L.Callback):
    """Every process saves (as Lightning requires) after the first micro-batch of the first window
    of 2 in epoch 1."""

    def __init__(self, path: Path):
        self.path = path
        self.saved = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        k = trainer.accumulate_grad_batches
        if not self.saved and trainer.current_epoch == 1 and k == 2 and batch_idx % k == 0:
            trainer.save_checkpoint(self.path)
            self.saved = True


def _ddp_worker(out_dir: str, mode: str) -> None:
    """Run by the DDP test in a subprocess (rank 0; Lightning starts rank 1 with the same command)."""
    # Each process its own resumable stream (different samples), so their gradients differ.
    rank = int(os.environ.get("LOCAL_RANK", 0))
    data = cluster_data(40, seed=10 + rank)
    x, y, _ = data.tensors
    L.seed_everything(0, verbose=False)
    model = Classifier(init_seed=0 if mode == "full" else 123)
    callbacks: list[L.Callback] = [AdaptiveGradAccumulation(max_accumulate_grad_batches=2)]
    if mode == "full":
        callbacks.append(SaveInsideFirstWindowOf2(Path(out_dir, "inside.ckpt")))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=callbacks,
    )
    ckpt_path = None if mode == "full" else Path(out_dir, f"{mode}.ckpt")
    trainer.fit(model, EpochSeededLoader(x, y, BATCH, seed=5, indices=True), ckpt_path=ckpt_path)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    Path(out_dir, f"{mode}-rank{trainer.global_rank}.json").write_text(json.dumps(weights))


def run_ddp_worker(out_dir: Path, mode: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    command = ["timeout", "-k", "10", "240", sys.executable, __file__, "--ddp-worker", str(out_dir), mode]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the 2-process DDP run ({mode}) hung")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"DDP run ({mode}) failed or timed out (rc={proc.returncode}):\n{text[-4000:]}"
    return text


def ddp_weights(out_dir: Path, mode: str) -> torch.Tensor:
    ranks = [torch.tensor(json.loads((out_dir / f"{mode}-rank{r}.json").read_text())) for r in (0, 1)]
    torch.testing.assert_close(ranks[0], ranks[1])
    return ranks[0]


@pytest.mark.slow
def test_ddp_resume_inside_a_window_continues_with_the_averaged_gradients(tmp_path):
    run_ddp_worker(tmp_path, "full")
    checkpoint = torch.load(tmp_path / "inside.ckpt", weights_only=False)
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("AdaptiveGradAccumulation")]
    state = checkpoint["callbacks"][key]
    assert state["window_batches"] == 1 and state["accumulate_grad_batches"] == 2
    assert state["window_gradients"]
    torch.save(checkpoint, tmp_path / "resume.ckpt")
    del state["window_gradients"]  # as an earlier version wrote it
    torch.save(checkpoint, tmp_path / "without.ckpt")

    output = run_ddp_worker(tmp_path, "resume")
    assert "holds no gradients" not in output
    full = ddp_weights(tmp_path, "full")
    torch.testing.assert_close(ddp_weights(tmp_path, "resume"), full)
    # The comparison can tell: without the window's first micro-batch the run ends elsewhere.
    assert "holds no gradients" in run_ddp_worker(tmp_path, "without")
    assert (ddp_weights(tmp_path, "without") - full).abs().max() > 1e-3


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--ddp-worker":
    _ddp_worker(sys.argv[2], sys.argv[3])


@_needs_torchdata
def test_a_resumed_epoch_keeps_its_random_order_on_a_stateful_loader(tmp_path):
    """StatefulDataLoader(shuffle=True): a random order per epoch, drawn from the global random
    state, which a resume does not restore. The epoch under way at the checkpoint finishes in the
    order it began with, although the loader makes its iterator twice when it is restored; the
    epochs after it are drawn afresh (as with any RandomSampler)."""
    config = Config("skipping+StatefulDataLoader(shuffle=True)", skipping=True, stateful=True, shuffle=True)
    full = fit(config, save=tmp_path)
    rows = full.log.rows
    mid_epoch = 0
    for path in sorted(tmp_path.glob("step=*.ckpt")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resumed = fit(config, ckpt_path=path, seed=123)
        offset = resumed.log.offset
        if offset == len(rows) or rows[offset - 1][0] != rows[offset][0]:
            continue  # saved after an epoch's last batch: the next epoch is drawn afresh
        mid_epoch += 1
        epoch = rows[offset][0]
        rest = [row[:3] for row in rows[offset:] if row[0] == epoch]
        assert [row[:3] for row in resumed.log.rows[: len(rest)]] == rest, path.name
    assert mid_epoch >= 10
