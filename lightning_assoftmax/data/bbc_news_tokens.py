"""``BBCNewsTokens``: next-token prediction over the BBC News text, 30522 WordPiece classes."""

from __future__ import annotations

import torch

from lightning_assoftmax._pretrained import BUNDLED_MINILM
from lightning_assoftmax.data._split import check_fractions, stratified_split_indices
from lightning_assoftmax.data._text import EncodedTexts, TokenizedTextDataModule
from lightning_assoftmax.data.bbc_news import load_bbc_news

__all__ = ["BBCNewsTokens"]


class BBCNewsTokens(TokenizedTextDataModule):
    """A token-classification task with one class per vocabulary entry (30522 for the default).

    Each article's WordPiece ids (no special tokens) are cut into windows of ``seq_len + 1`` ids
    that overlap by one; a window gives inputs ``w[:-1]`` and targets ``w[1:]``. The articles are
    split like :class:`BBCNews` (same ``seed`` and fractions give the same articles per split), so
    no text is shared between splits.

    Batches are dicts: ``input_ids`` (N, L) long, ``attention_mask`` (N, L), ``labels`` (N, L) long
    with ``ignore_index`` (-100) where an article's last window is shorter than the batch.

    Args:
        batch_size: windows per batch.
        seq_len: tokens per window (the sequence length ``L``).
        max_windows_per_article: keep at most this many windows of each article (None: all),
            to make a smaller task.
        val_fraction, test_fraction, seed: the article split, as in :class:`BBCNews`.
        tokenizer: tokenizer name or directory (default: bundled all-MiniLM-L6-v2, offline).
        cache_dir: where token ids are cached (default ``~/.cache/lightning_assoftmax``).
        num_workers: dataloader worker processes.
    """

    ignore_index: int = -100

    def __init__(
        self,
        batch_size: int = 16,
        seq_len: int = 128,
        max_windows_per_article: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        tokenizer: str = BUNDLED_MINILM,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, tokenizer, cache_dir, num_workers)
        check_fractions(val_fraction, test_fraction)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
        if max_windows_per_article is not None and (
            isinstance(max_windows_per_article, bool) or not isinstance(max_windows_per_article, int)
            or max_windows_per_article < 1
        ):
            raise ValueError(
                f"max_windows_per_article must be a positive integer or None (all), got {max_windows_per_article!r}."
            )
        self.seq_len = seq_len
        self.max_windows_per_article = max_windows_per_article
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.split_indices: dict[str, list[int]] = {}

    @property
    def num_classes(self) -> int:
        """One class per token id: the tokenizer's vocabulary size."""
        return self.vocab_size

    @property
    def class_counts(self) -> list[int]:
        """How often each class (token id) is a target in the training split, ``num_classes``
        counts (for the frequency-based output layers, e.g. ``TokenClassifier(head="adaptive")``).
        Reads the data (``setup``) on first use."""
        self.setup("fit")
        if "train" not in self.datasets:
            return [0] * self.num_classes
        targets = torch.cat(self.datasets["train"].targets)
        return torch.bincount(targets, minlength=self.num_classes).tolist()

    def windows(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)`` pairs of one article's ids, each of length ``<= seq_len``."""
        ids = ids.long()
        pairs = []
        for start in range(0, max(len(ids) - 1, 0), self.seq_len):
            window = ids[start : start + self.seq_len + 1]
            pairs.append((window[:-1], window[1:]))
            if self.max_windows_per_article is not None and len(pairs) == self.max_windows_per_article:
                break
        return pairs

    def _corpora(self) -> list[tuple[list[str], str]]:
        return [(load_bbc_news()[0], "Tokenizing BBC News")]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        texts, labels, _ = load_bbc_news()
        ids = self._encode(texts, "Tokenizing BBC News")
        train, val, test = stratified_split_indices(labels, self.val_fraction, self.test_fraction, self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        for split, indices in self.split_indices.items():
            pairs = [pair for i in indices for pair in self.windows(ids[i])]
            if pairs:
                inputs, targets = zip(*pairs, strict=True)
                self.datasets[split] = _TokenWindows(list(inputs), list(targets))


class _TokenWindows(EncodedTexts):
    """Windows of ids with per-token targets (``labels`` is a list of (L,) tensors)."""

    def __init__(self, input_ids: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        super().__init__(input_ids)
        self.targets = targets

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.targets[index]}
