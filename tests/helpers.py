"""Tiny Lightning modules and data for the tests (fast on 2 CPU cores)."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import ASSoftmaxMixin


def benchmark_module(script: str) -> Iterator[ModuleType]:
    """``benchmarks/<script>.py`` imported as a module, for a module-scoped fixture to ``yield
    from``: registered in ``sys.modules`` (dataclasses and pickling need that) until the fixture
    ends."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` (restored after the test) so each call appends to the list returned."""
    calls: list = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


class XYSteps:
    """``(inputs, target)`` batches through ``self(inputs)`` into ``as_softmax_loss``, every stage."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.as_softmax_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.as_softmax_loss(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.as_softmax_loss(self(x), y)


class TinyClassifier(XYSteps, ASSoftmaxMixin, L.LightningModule):
    def __init__(self, in_features: int = 8, num_classes: int = 4, lr: float = 0.05, delta: float = 0.1, **kwargs):
        super().__init__(delta=delta, **kwargs)
        self.save_hyperparameters()
        self.net = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def blobs(n: int = 96, in_features: int = 8, num_classes: int = 4, seed: int = 0, ignore_share: float = 0.0):
    """Separable Gaussian blobs: the masked ratio rises within a few epochs."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, in_features, generator=gen) * 3
    y = torch.randint(num_classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, in_features, generator=gen)
    if ignore_share:
        y = y.clone()
        y[torch.rand(n, generator=gen) < ignore_share] = -100
    return TensorDataset(x, y)


def loader(dataset, batch_size: int = 16, shuffle: bool = False):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=2,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class EpochSeededLoader:
    """A resumable batch iterable: one fixed permutation per epoch, restartable mid-epoch.

    Lightning calls ``sampler.set_epoch`` at every epoch start and saves ``state_dict`` in
    checkpoints; sized iterables are not prefetched, so ``consumed`` is what the loop has taken.
    With ``indices=True`` each batch also holds its samples' indices: ``(x, y, idx)``.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True, indices: bool = False
    ):
        self.x, self.y, self.batch_size, self.seed, self.shuffle = x, y, batch_size, seed, shuffle
        self.indices = indices
        self.sampler = self
        self.epoch = 0
        self.consumed = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        else:
            order = torch.arange(n)
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch and self._resume[1] < len(self):
            start = self._resume[1]
        self._resume = None
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            self.consumed = b + 1
            yield (self.x[idx], self.y[idx], idx) if self.indices else (self.x[idx], self.y[idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (state["epoch"], state["consumed"])


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
