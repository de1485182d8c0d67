"""Deterministic, seeded train/validation/test splits shared by the datamodules."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

__all__ = ["SplitDataModule", "check_fractions", "random_split_indices", "stratified_split_indices"]


class SplitDataModule(L.LightningDataModule, abc.ABC):
    """A datamodule whose splits live in ``self.datasets`` (``"train"``, ``"val"``, ``"test"``,
    optionally ``"predict"``); subclasses build one loader per split in ``_loader``."""

    datasets: dict

    @abc.abstractmethod
    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """The loader of ``self.datasets[split]``, shuffled for training."""

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise a ``ValueError`` unless both fractions lie in ``[0, 1)`` and leave training data."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise TypeError(f"{name} must be a number in [0, 1), got {value!r}.")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1) (a share of the examples), got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must stay below 1 to leave training examples, got "
            f"{val_fraction} + {test_fraction}; lower one of them."
        )


def _cut(indices: torch.Tensor, val_fraction: float, test_fraction: float) -> tuple[list, list, list]:
    n = len(indices)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    val = indices[:n_val].tolist()
    test = indices[n_val : n_val + n_test].tolist()
    train = indices[n_val + n_test :].tolist()
    return train, val, test


def stratified_split_indices(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """``(train, val, test)`` example indices, each class split in the given proportions.

    Within each class (in increasing label order) the examples are shuffled by one
    ``torch.Generator`` seeded with ``seed``, so the split depends on the seed and the labels only.
    Each returned list is sorted.
    """
    check_fractions(val_fraction, test_fraction)
    generator = torch.Generator().manual_seed(seed)
    label_tensor = torch.as_tensor(list(labels), dtype=torch.long)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for cls in torch.unique(label_tensor).tolist():
        members = torch.nonzero(label_tensor == cls).flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        for part, chosen in zip(parts, _cut(shuffled, val_fraction, test_fraction), strict=True):
            part.extend(chosen)
    return tuple(sorted(part) for part in parts)  # type: ignore[return-value]


def random_split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """``(train, val, test)`` indices of ``n`` examples by one seeded shuffle (for multi-label data)."""
    check_fractions(val_fraction, test_fraction)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return tuple(sorted(part) for part in _cut(order, val_fraction, test_fraction))  # type: ignore[return-value]
