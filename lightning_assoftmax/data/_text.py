"""Tokenization with an on-disk cache, padded batches, and the base of the text datamodules."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_assoftmax._cache import default_cache_dir
from lightning_assoftmax._pretrained import BUNDLED_MINILM, load_tokenizer
from lightning_assoftmax.data._split import SplitDataModule

__all__ = ["EncodedTexts", "PadCollate", "TextTokenizer", "TokenizedTextDataModule", "default_cache_dir"]

_CACHE_VERSION = "1"


class TextTokenizer:
    """A ``transformers`` fast tokenizer that encodes many texts once and caches the ids on disk.

    Ids are cached *without* special tokens and untruncated, so one cache entry serves every
    ``max_length`` and both the classification and the next-token tasks.
    """

    def __init__(self, name: str = BUNDLED_MINILM) -> None:
        self.name = name
        self.tokenizer = load_tokenizer(name)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer {name!r} has no fast (Rust) implementation; pick one that has.")
        # Long articles are truncated by the datamodules, not here: silence the length warning.
        self.tokenizer.model_max_length = 1 << 30
        with_special = self.tokenizer("a")["input_ids"]
        content = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(with_special)) if with_special[i : i + len(content)] == content)
        self.prefix = list(with_special[:start])
        self.suffix = list(with_special[start + len(content) :])
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self.vocab_size = len(self.tokenizer)
        self.fingerprint = hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()

    def encode(
        self, texts: Sequence[str], *, cache_dir: str | Path | None = None, desc: str = "Tokenizing"
    ) -> list[Tensor]:
        """Token ids (int32, no special tokens) of each text; read from / written to ``cache_dir``."""
        digest = hashlib.sha256(f"{_CACHE_VERSION}\0{self.fingerprint}\0".encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
        path = Path(cache_dir) / f"tokens-{digest.hexdigest()[:24]}.pt" if cache_dir is not None else None
        if path is not None and path.is_file():
            stored = torch.load(path, weights_only=True)
            return list(torch.split(stored["ids"], stored["lengths"].tolist()))
        ids = self._encode_uncached(texts, desc)
        if path is not None:
            lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
            flat = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int32)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a concurrent reader (another rank) never sees half a file.
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
                torch.save({"ids": flat, "lengths": lengths}, tmp)
            os.replace(tmp.name, path)
        return ids

    def _encode_uncached(self, texts: Sequence[str], desc: str) -> list[Tensor]:
        from tqdm.auto import tqdm

        chunk = 256
        out: list[Tensor] = []
        with tqdm(total=len(texts), desc=desc, unit="text", disable=len(texts) < 2 * chunk) as bar:
            for start in range(0, len(texts), chunk):
                batch = list(texts[start : start + chunk])
                encoded = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
                out.extend(torch.tensor(ids, dtype=torch.int32) for ids in encoded)
                bar.update(len(batch))
        return out

    def with_special_tokens(self, ids: Tensor, max_length: int) -> Tensor:
        """``prefix + ids[:room] + suffix`` as a long tensor of at most ``max_length`` ids."""
        room = max_length - len(self.prefix) - len(self.suffix)
        body = ids[:room].long()
        return torch.cat([torch.tensor(self.prefix, dtype=torch.long), body, torch.tensor(self.suffix, dtype=torch.long)])


class EncodedTexts(Dataset):
    """Variable-length token ids with optional targets; items are ``{"input_ids", "labels"}`` dicts."""

    def __init__(self, input_ids: list[Tensor], labels: Tensor | None = None) -> None:
        if labels is not None and len(labels) != len(input_ids):
            raise ValueError(f"got {len(input_ids)} texts but {len(labels)} labels.")
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"input_ids": self.input_ids[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class PadCollate:
    """Pads ``input_ids`` to the longest in the batch.

    Returns ``input_ids`` (N, L) long, ``attention_mask`` (N, L) long (1 = real token) and the
    stacked ``labels`` when present: (N) long, (N, C) float for multi-label, or (N, L) long for
    token tasks (padded with ``label_pad``).
    """

    def __init__(self, pad_token_id: int, label_pad: int = -100) -> None:
        self.pad_token_id = pad_token_id
        self.label_pad = label_pad

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in items[0]:
            labels = [item["labels"] for item in items]
            if labels[0].dim() == 1 and labels[0].dtype == torch.long:  # per-token targets
                padded = torch.full((len(items), longest), self.label_pad, dtype=torch.long)
                for row, target in enumerate(labels):
                    padded[row, : len(target)] = target
                batch["labels"] = padded
            else:
                batch["labels"] = torch.stack(labels)
        return batch


class TokenizedTextDataModule(SplitDataModule):
    """Shared plumbing of the text datamodules: tokenizer, cache, splits and dataloaders.

    Subclasses list the texts they tokenize in ``_corpora`` and fill ``self.datasets`` (keys
    ``train``, ``val``, ``test``, ``predict``) in ``setup``, encoding through ``_encode``.
    ``prepare_data`` (which Lightning runs on one process per node, before ``setup`` on every
    process) tokenizes into the on-disk cache, so that ``setup`` only reads it; ``setup`` called on
    its own, without ``prepare_data``, tokenizes what the cache lacks.

    Attributes read by the CLI (and by a model you build yourself): ``vocab_size``,
    ``pad_token_id``, ``num_classes``, ``multilabel``.
    """

    multilabel: bool = False

    def __init__(
        self,
        batch_size: int,
        tokenizer: str,
        cache_dir: str | None,
        num_workers: int,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        self.batch_size = batch_size
        self.tokenizer_name = tokenizer
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}
        self._text_tokenizer: TextTokenizer | None = None

    @property
    def text_tokenizer(self) -> TextTokenizer:
        if self._text_tokenizer is None:
            self._text_tokenizer = TextTokenizer(self.tokenizer_name)
        return self._text_tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (the embedding table's size)."""
        return self.text_tokenizer.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.text_tokenizer.pad_token_id

    def _corpora(self) -> list[tuple[list[str], str]]:
        """``(texts, progress label)`` of every list of texts that ``setup`` encodes."""
        return []

    def _encode(self, texts: list[str], desc: str) -> list[Tensor]:
        return self.text_tokenizer.encode(texts, cache_dir=self.cache_dir, desc=desc)

    def prepare_data(self) -> None:
        """Tokenize every text into the cache (``cache_dir``); assigns no state."""
        for texts, desc in self._corpora():
            self._encode(texts, desc)

    def _collate(self) -> Any:
        return PadCollate(self.pad_token_id)

    def _missing_split_hint(self, split: str) -> str:
        return ""

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            hint = ": call setup() first" if not self.datasets else self._missing_split_hint(split)
            raise RuntimeError(f"{type(self).__name__} has no {split!r} data{hint}.")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self._collate(),
            persistent_workers=self.num_workers > 0,
        )
