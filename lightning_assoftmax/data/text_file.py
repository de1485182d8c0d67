"""``TextFile``: a user's own labelled text in CSV, TSV or JSON Lines, single- or multi-label."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_assoftmax._pretrained import BUNDLED_MINILM
from lightning_assoftmax.data._split import (
    check_fractions,
    random_split_indices,
    stratified_split_indices,
)
from lightning_assoftmax.data._text import EncodedTexts, TokenizedTextDataModule

__all__ = ["LabeledTexts", "TextFile", "read_labeled_texts"]

_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class LabeledTexts:
    """Rows of one file: ``texts[i]`` with ``labels[i]`` (a list of label names) from line ``lines[i]``."""

    path: Path
    texts: list[str]
    labels: list[list[str]] | None
    lines: list[int]


def _csv_rows(path: Path, text_column: str, label_column: str, need_labels: bool) -> Iterator[tuple[int, Any, Any]]:
    delimiter = _CSV_DELIMITERS[path.suffix.lower()]
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty; expected a header line with columns {text_column!r} and {label_column!r}.")
        header = [name.strip() for name in header]
        wanted = [text_column] + ([label_column] if need_labels else [])
        for column in wanted:
            if column not in header:
                raise ValueError(
                    f"{path}: no column {column!r} in the header (columns: {', '.join(map(repr, header))}); "
                    f"rename the column or set text_column / label_column."
                )
        text_at = header.index(text_column)
        label_at = header.index(label_column) if label_column in header else None
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{start}: expected {len(header)} fields ({', '.join(header)}), found {len(row)}; "
                    "quote fields that contain the delimiter."
                )
            yield start, row[text_at], row[label_at] if label_at is not None else None


def _jsonl_rows(path: Path, text_column: str, label_column: str, need_labels: bool) -> Iterator[tuple[int, Any, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); write one JSON object per line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object like {{\"{text_column}\": ..., \"{label_column}\": ...}}, got {type(record).__name__}.")
            for key in [text_column] + ([label_column] if need_labels else []):
                if key not in record:
                    raise ValueError(
                        f"{path}:{number}: no key {key!r} (keys: {', '.join(map(repr, record))}); "
                        "rename it or set text_column / label_column."
                    )
            yield number, record[text_column], record.get(label_column)


def _parse_label(value: Any, where: str, multilabel: bool, delimiter: str) -> list[str]:
    if value is None:
        raise ValueError(f"{where}: empty label; every row needs a label.")
    if isinstance(value, list):
        if not multilabel:
            raise ValueError(f"{where}: the label is a list {value!r}; set multilabel=True for multi-label data.")
        parts = [str(part).strip() for part in value]
    elif multilabel:
        parts = [part.strip() for part in str(value).split(delimiter)]
    else:
        parts = [str(value).strip()]
    if not parts or any(not part for part in parts):
        hint = f" (labels are separated by {delimiter!r})" if multilabel else ""
        raise ValueError(f"{where}: empty label {value!r}{hint}; every row needs at least one non-empty label.")
    return list(dict.fromkeys(parts))


def read_labeled_texts(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    multilabel: bool = False,
    label_delimiter: str = "|",
    need_labels: bool = True,
) -> LabeledTexts:
    """Read and validate a ``.csv`` / ``.tsv`` (header line) or ``.jsonl`` (one object per line) file.

    Raises ``ValueError`` naming the file and line for a missing column, an empty text or label, a
    row with the wrong number of fields or a malformed JSON line. With ``need_labels=False`` a
    missing label column is allowed (prediction input).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix in _CSV_DELIMITERS:
        rows = _csv_rows(path, text_column, label_column, need_labels)
    elif suffix in _JSONL_SUFFIXES:
        rows = _jsonl_rows(path, text_column, label_column, need_labels)
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv or .jsonl (one JSON object per line).")
    texts: list[str] = []
    labels: list[list[str]] = []
    lines: list[int] = []
    try:
        for line, text, label in rows:
            where = f"{path}:{line}"
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: empty text in column {text_column!r}.")
            texts.append(text)
            lines.append(line)
            if need_labels:
                labels.append(_parse_label(label, where, multilabel, label_delimiter))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8.") from None
    if not texts:
        raise ValueError(f"{path}: no rows; the file needs a header and at least one row.")
    return LabeledTexts(path, texts, labels if need_labels else None, lines)


class TextFile(TokenizedTextDataModule):
    """Text classification from your own files: ``text,label`` rows in CSV/TSV or JSON Lines.

    Classes are the sorted label names found in ``train_file``, or ``class_names`` when given (the
    CLI gives a checkpoint's names to ``test`` and ``predict``, which then need no training file).
    Validation and test files may only use those labels (an unknown one is reported with its file
    and line). Without ``val_file`` a seeded ``val_fraction`` of the training rows is held out
    (stratified for single-label data).

    Multi-label (``multilabel=True``): a CSV label field holds several names separated by
    ``label_delimiter`` (``sports|politics``); a JSON Lines label may also be a list. Targets are
    then multi-hot floats (N, C) and ``multilabel`` tells the model to use the multi-label loss.

    Batches are dicts: ``input_ids`` (N, L) long, ``attention_mask`` (N, L), ``labels`` (N) long
    or (N, C) float. Prediction reads ``predict_file`` (labels optional), else the test split;
    ``predict_texts`` are its texts, in order.

    Args:
        train_file: training rows (``.csv``, ``.tsv``, ``.jsonl``); may be None for ``test`` and
            ``predict`` when ``class_names`` is given.
        val_file: validation rows; None holds out ``val_fraction`` of the training rows.
        test_file: test rows (optional).
        predict_file: rows to predict (optional; its label column is not needed).
        text_column: name of the text column / key.
        label_column: name of the label column / key.
        multilabel: rows carry a set of labels.
        label_delimiter: separator of the labels in one multi-label field.
        val_fraction: share of the training rows held out when there is no ``val_file``.
        seed: seed of that hold-out.
        batch_size: texts per batch.
        max_length: tokens kept per text, special tokens included.
        tokenizer: tokenizer name or directory (default: bundled all-MiniLM-L6-v2, offline).
        cache_dir: where token ids are cached (default ``~/.cache/lightning_assoftmax``).
        num_workers: dataloader worker processes.
        class_names: the label names in class order; None: the sorted names of ``train_file``.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        multilabel: bool = False,
        label_delimiter: str = "|",
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        max_length: int = 256,
        tokenizer: str = BUNDLED_MINILM,
        cache_dir: str | None = None,
        num_workers: int = 0,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(batch_size, tokenizer, cache_dir, num_workers)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an integer >= 3 (room for special tokens), got {max_length!r}.")
        if not label_delimiter:
            raise ValueError("label_delimiter must be a non-empty string, e.g. '|'.")
        if val_file is None:
            check_fractions(val_fraction, 0.0)
        self.multilabel = bool(multilabel)
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.seed = seed
        options = {
            "text_column": text_column,
            "label_column": label_column,
            "multilabel": self.multilabel,
            "label_delimiter": label_delimiter,
        }
        self.files: dict[str, LabeledTexts] = {}
        if train_file is None and class_names is None:
            raise ValueError(
                "TextFile needs train_file (the classes are its label names), or class_names to test "
                "or predict with a trained model."
            )
        if class_names is not None:
            if isinstance(class_names, str) or len(set(map(str, class_names))) != len(class_names):
                raise ValueError(f"class_names must be a list of distinct label names, got {class_names!r}.")
            self.class_names = [str(name) for name in class_names]
        if train_file is not None:
            self.files["train"] = read_labeled_texts(train_file, **options)
            assert self.files["train"].labels is not None
            if class_names is None:
                self.class_names = sorted({name for row in self.files["train"].labels for name in row})
            else:
                self._check_known_labels(self.files["train"])
        if len(self.class_names) < 2 and not self.multilabel:
            raise ValueError(
                f"{train_file}: all rows have the label {self.class_names[0]!r}; a classifier needs "
                "at least 2 classes."
            )
        self.num_classes = len(self.class_names)
        for split, file in (("val", val_file), ("test", test_file)):
            if file is not None:
                self.files[split] = read_labeled_texts(file, **options)
                self._check_known_labels(self.files[split])
        if predict_file is not None:
            self.files["predict"] = read_labeled_texts(predict_file, **options, need_labels=False)

    def _check_known_labels(self, rows: LabeledTexts) -> None:
        known = set(self.class_names)
        assert rows.labels is not None
        from_file = "train" in self.files and self.files["train"] is not rows
        source = f"the training file {self.files['train'].path}" if from_file else "class_names"
        for line, names in zip(rows.lines, rows.labels, strict=True):
            for name in names:
                if name not in known:
                    listed = ", ".join(map(repr, self.class_names[:20])) + (", ..." if len(known) > 20 else "")
                    raise ValueError(
                        f"{rows.path}:{line}: label {name!r} does not occur in {source} "
                        f"(known labels: {listed}); fix the label or add training rows with it."
                    )

    @property
    def predict_texts(self) -> list[str]:
        """The texts ``predict`` runs on (``predict_file``, else ``test_file``), in order."""
        for split in ("predict", "test"):
            if split in self.files:
                return list(self.files[split].texts)
        return []

    def _missing_split_hint(self, split: str) -> str:
        hints = {"train": ": set train_file", "test": ": set test_file", "predict": ": set predict_file or test_file"}
        return hints.get(split, "")

    def encode_labels(self, rows: list[list[str]]) -> torch.Tensor:
        """Class indices (N) long, or multi-hot (N, C) float for multi-label data."""
        index = {name: i for i, name in enumerate(self.class_names)}
        if not self.multilabel:
            return torch.tensor([index[names[0]] for names in rows], dtype=torch.long)
        target = torch.zeros(len(rows), self.num_classes)
        for row, names in enumerate(rows):
            target[row, [index[name] for name in names]] = 1.0
        return target

    def _parts(self) -> dict[str, tuple[list[str], list[list[str]] | None]]:
        """``split -> (texts, label names)``, the validation rows held out of the training file
        when there is no ``val_file``."""
        parts: dict[str, tuple[list[str], list[list[str]] | None]] = {
            split: (rows.texts, rows.labels) for split, rows in self.files.items()
        }
        if "val" not in self.files and "train" in self.files:
            texts, labels = parts["train"]
            assert labels is not None
            if self.multilabel:
                train, val, _ = random_split_indices(len(texts), self.val_fraction, 0.0, self.seed)
            else:
                train, val, _ = stratified_split_indices(self.encode_labels(labels).tolist(), self.val_fraction, 0.0, self.seed)
            parts["train"] = ([texts[i] for i in train], [labels[i] for i in train])
            parts["val"] = ([texts[i] for i in val], [labels[i] for i in val])
        return parts

    def _corpora(self) -> list[tuple[list[str], str]]:
        return [(texts, f"Tokenizing {split} texts") for split, (texts, _) in self._parts().items() if texts]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        tokenizer = self.text_tokenizer
        for split, (texts, labels) in self._parts().items():
            if not texts:
                continue
            ids = self._encode(texts, f"Tokenizing {split} texts")
            encoded = [tokenizer.with_special_tokens(x, self.max_length) for x in ids]
            self.datasets[split] = EncodedTexts(encoded, self.encode_labels(labels) if labels is not None else None)
