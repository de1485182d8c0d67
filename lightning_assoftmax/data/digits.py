"""``Digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax.data._split import (
    SplitDataModule,
    check_fractions,
    stratified_split_indices,
)

__all__ = ["Digits"]


class Digits(SplitDataModule):
    """A small offline image task: batches are ``(images, labels)``, images (N, 1, 8, 8) in [0, 1].

    The split is stratified by class and depends only on ``seed`` and the fractions.
    ``predict`` uses the test split.

    Args:
        batch_size: images per batch.
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for testing.
        seed: seed of the split.
    """

    num_classes: int = 10
    class_names: tuple[str, ...] = tuple(str(digit) for digit in range(10))
    in_channels: int = 1
    multilabel: bool = False

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
    ) -> None:
        super().__init__()
        check_fractions(val_fraction, test_fraction)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.datasets: dict[str, TensorDataset] = {}
        self.split_indices: dict[str, list[int]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("Digits needs scikit-learn: `pip install 'lightning-assoftmax[cli]'`.") from err
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = stratified_split_indices(labels.tolist(), self.val_fraction, self.test_fraction, self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        for split, indices in self.split_indices.items():
            if indices:
                self.datasets[split] = TensorDataset(images[indices], labels[indices])

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"Digits has no {split!r} data" + (": call setup() first." if not self.datasets else "."))
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle)
