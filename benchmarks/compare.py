"""The paper's comparison on our bundled data: every softmax-family loss on a ready-made set.

What is specific to this study lives here; the grid, the statistics, the tables and the figure
are the package's (``lightning_assoftmax.compare``, the ``lightning-assoftmax compare`` command).
This script trains the ready-made ``TextClassifier`` (bag of MiniLM word embeddings + MLP, the
model of ``examples/bbc_news.yaml``) on one of the offline text datamodules (``--data``:
``BBCNews`` by default, ``CLINC150``, ``Banking77``, ``HWU64``, ``DBpedia219``) with the paper's
configurations: every loss of ``build_loss`` and AS-Softmax with ``AdaptiveGradAccumulation``
(AS-Speed), ``--seeds`` seeds each, paired by seed. What it adds to the command:

* the sets' epochs (:data:`BAG_EPOCHS`), ``sparse_softmax``'s k (3 on BBC News' 5 classes, else
  10) and the opt-in ``l_softmax_annealed`` / ``sphereface_annealed`` configurations (the margin
  loss with ``lam`` floor 5 and ``MarginAnnealing``'s default schedule);
* a compact embedding table: only the rows of the token ids that occur in the data (the same fits
  as the full table, each optimizer step cheaper; ``--full-vocabulary`` keeps it whole);
* ``--quick`` subsets and ``--backbone`` (fine-tune the bundled MiniLM encoder instead).

Each configuration is an arm of the command (``--print-command`` prints the equivalent
``lightning-assoftmax compare`` command, which gives the same fits with the full embedding table)::

    python benchmarks/compare.py                    # BBC News: 17 configurations x 3 seeds x 6 epochs, ~11 min
    python benchmarks/compare.py --out runs/compare # + journal.jsonl, fits.csv, summary.md, compare.png
    python benchmarks/compare.py --data CLINC150 --seeds 5 --out runs/clinc150
    python benchmarks/compare.py --quick            # small subsets, 1 seed, 1 epoch: a smoke run
    python benchmarks/compare.py --backbone --seeds 1 --losses softmax,as_softmax,as_speed

Rerunning with the same ``--out`` skips the fits its journal holds. Timings depend on what else
runs on the machine.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Subset

from lightning_assoftmax.compare import (
    CompareGrid,
    CompareResult,
    FitSetup,
    parse_arms,
    run_compare,
)
from lightning_assoftmax.compare.arms import Arm
from lightning_assoftmax.data import CLINC150, HWU64, Banking77, BBCNews, DBpedia219
from lightning_assoftmax.data._text import PadCollate, TokenizedTextDataModule
from lightning_assoftmax.family import LOSS_NAMES
from lightning_assoftmax.models import TextClassifier

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
AS_SPEED = "as_speed"
BASELINE = "softmax"
CONFIG_NAMES: tuple[str, ...] = (*LOSS_NAMES, AS_SPEED)
#: Opt-in configurations (``--losses``, not in the default grid): L-Softmax and SphereFace trained
#: as their papers do, with ``MarginAnnealing``'s default schedule (lam 1000 at step 0, lowered
#: as 1000 / (1 + 0.12 step)) towards the floor 5 of the SphereFace authors' released training.
ANNEALED = {"l_softmax_annealed": "l_softmax", "sphereface_annealed": "sphereface"}
ANNEALED_FLOOR = 5.0
EXTRA_CONFIGS: tuple[str, ...] = tuple(ANNEALED)
KNOWN_CONFIGS: tuple[str, ...] = (*CONFIG_NAMES, *EXTRA_CONFIGS)
AS_SPEED_ARM = "as_softmax + AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=2)"

#: The ready-made single-label text datamodules, and the epochs of a bag-model fit on each: enough
#: to pass the best validation accuracy and enter the phase in which softmax's validation cross
#: entropy rises (measured with this script, see docs/results.md).
DATASETS: dict[str, type[TokenizedTextDataModule]] = {
    "BBCNews": BBCNews,
    "CLINC150": CLINC150,
    "Banking77": Banking77,
    "HWU64": HWU64,
    "DBpedia219": DBpedia219,
}
BAG_EPOCHS = {"BBCNews": 6, "CLINC150": 8, "Banking77": 8, "HWU64": 8, "DBpedia219": 8}
# --quick keeps every n-th example of each split, n chosen to leave about this many (on BBC News,
# whose splits are in class order, every class stays: 156 / 67 / 67 articles).
QUICK_SIZES = {"train": 160, "val": 80, "test": 80}
BACKBONE_MAX_LENGTH = 128


def quick_stride(size: int, split: str) -> int:
    """Keep every ``quick_stride``-th example of a split of ``size`` examples in ``--quick``."""
    return max(1, math.ceil(size / QUICK_SIZES[split]))


def arm_spelling(name: str, sparse_k: int) -> str:
    """The ``lightning-assoftmax compare`` arm of a configuration name."""
    if name == AS_SPEED:
        return AS_SPEED_ARM
    if name in ANNEALED:
        return f"{ANNEALED[name]}(lam={ANNEALED_FLOOR}) + MarginAnnealing"
    if name == "sparse_softmax":
        return f"sparse_softmax(k={sparse_k})"
    return name


def occurring_token_ids(data: TokenizedTextDataModule) -> Tensor:
    """Sorted token ids (long) that occur in any split, the padding id included."""
    seen = [torch.tensor([data.pad_token_id])]
    for dataset in data.datasets.values():
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        seen.extend(ids.long() for ids in base.input_ids)
    return torch.unique(torch.cat(seen))


def compact_vocabulary(data: TokenizedTextDataModule) -> Tensor:
    """Renumber the token ids of every split to ``0 .. V'-1`` (V' ids that occur); returns the
    original id of each new one, the rows a bag model's embedding table keeps.

    A row of the table that no text looks up gets no gradient and reaches no output: AdamW decays
    it, per element, and nothing reads it. Dropping those rows changes no prediction or loss, only
    the cost of each optimizer step (AdamW and the dense embedding gradient go over V' rows, not
    the tokenizer's 30522).
    """
    used = occurring_token_ids(data)
    new_id = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    new_id[used] = torch.arange(len(used))
    for dataset in data.datasets.values():
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        base.input_ids = [new_id[ids.long()] for ids in base.input_ids]
    # Padding is masked out of the bag; its new id must still index the table.
    pad = int(new_id[data.pad_token_id])
    data._collate = lambda: PadCollate(pad)
    return used


def build_model(arm: Arm, data: TokenizedTextDataModule, args: argparse.Namespace) -> TextClassifier:
    common = {
        "num_classes": data.num_classes,
        "vocab_size": data.vocab_size,
        "loss": arm.loss,
        "loss_kwargs": dict(arm.loss_kwargs) or None,
        "delta": arm.delta if arm.delta is not None else args.delta,
    }
    if args.backbone:
        model = TextClassifier(backbone=args.pretrained, hidden_dim=0, pooling="mean", lr=1e-4, **common)
        if args.kept_token_ids is not None:
            # The same pretrained rows, only those the data can look up (see compact_vocabulary).
            words = model.encoder.get_input_embeddings()
            table = words.weight.detach()[args.kept_token_ids].clone()
            pad = words.padding_idx
            new_pad = None if pad is None else int(torch.searchsorted(args.kept_token_ids, pad))
            model.encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(table, freeze=False, padding_idx=new_pad))
        return model
    model = TextClassifier(embeddings=args.pretrained, hidden_dim=128, lr=3e-3, **common)
    if args.kept_token_ids is not None:
        table = model.embedding.weight.detach()[args.kept_token_ids].clone()
        model.embedding = torch.nn.EmbeddingBag.from_pretrained(table, freeze=False, mode="sum")
    return model


def trainer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer of every fit (the command's ``--trainer.*`` of :func:`equivalent_command`)."""
    options: dict[str, Any] = {
        "max_epochs": args.epochs,
        "val_check_interval": 1.0 / args.val_per_epoch,
        "num_sanity_val_steps": 0,
    }
    if args.max_batches is not None:
        options.update(
            limit_train_batches=args.max_batches,
            limit_val_batches=args.max_batches,
            limit_test_batches=args.max_batches,
        )
    return options


def equivalent_command(args: argparse.Namespace, names: list[str]) -> str:
    """The ``lightning-assoftmax compare`` command that trains the same fits (with the full
    embedding table and the datamodule's whole splits: not for ``--quick``)."""
    model = ["--model=TextClassifier"]
    if args.backbone:
        model += [f"--model.backbone={args.pretrained}", "--model.hidden_dim=0", "--model.lr=0.0001"]
    elif args.pretrained != MINILM:
        model.append(f"--model.embeddings={args.pretrained}")
    if args.delta != 0.1:
        model.append(f"--model.delta={args.delta}")
    data = [f"--data={args.data}", f"--data.batch_size={args.batch_size}", f"--data.max_length={args.max_length}"]
    if args.pretrained != MINILM:
        data.append(f"--data.tokenizer={args.pretrained}")
    trainer = [f"--trainer.{key}={value}" for key, value in trainer_options(args).items()]
    spelled = [arm_spelling(name, args.sparse_k) for name in names]
    # Arms up to the first whose keywords hold a comma form the comma-separated list; each later
    # arm is appended with --arms+= (the order, baseline first, is kept).
    lead = next((i for i, arm in enumerate(spelled) if "," in arm), len(spelled))
    arms = ["--arms", ",".join(spelled[:lead])] if lead else []
    arms += [f"--arms+={arm}" for arm in spelled[lead:]]
    seeds = str(args.seeds) if args.first_seed == 0 else str(args.seed_list).replace(" ", "")
    parts = ["lightning-assoftmax", "compare", *model, *data, *trainer, *arms, "--seeds", seeds]
    if args.own_data_order:
        parts.append("--same_data_order=false")
    if args.shard is not None:
        parts += ["--shard", args.shard]
    if args.out is not None:
        parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(part) for part in parts)


def describe(args: argparse.Namespace, data: TokenizedTextDataModule) -> str:
    if args.backbone:
        model = f"TextClassifier(backbone={args.pretrained}, mean pooling, linear head), lr 1e-4"
    else:
        model = f"TextClassifier(embeddings={args.pretrained}, hidden_dim=128), lr 3e-3"
    if args.kept_token_ids is not None:
        model += f", word-embedding rows of the {len(args.kept_token_ids)} token ids that occur in the data"
    sizes = " / ".join(str(len(data.datasets[s])) for s in ("train", "val", "test"))
    quick = " (--quick subsets)" if args.quick else ""
    return (
        f"{args.data} ({sizes} texts{quick}, {data.num_classes} classes, max_length {args.max_length}, "
        f"batch {args.batch_size}), {model}, AdamW, {args.epochs} epoch(s), {args.val_per_epoch} "
        f"validation runs per epoch, seeds {args.seed_list}, torch threads {torch.get_num_threads()}"
    )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="BBCNews", choices=list(DATASETS), help="the ready-made datamodule (default BBCNews)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per configuration (0, 1, ...); default 3 (1 with --quick)"
    )
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds are first_seed, first_seed + 1, ..."
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: " + ", ".join(f"{k} {v}" for k, v in BAG_EPOCHS.items()) + " (bag model); 1 (--backbone)",
    )
    parser.add_argument(
        "--losses",
        default=",".join(CONFIG_NAMES),
        help=f"comma-separated configurations among {', '.join(KNOWN_CONFIGS)} "
        f"({AS_SPEED}: as_softmax with AdaptiveGradAccumulation; {', '.join(EXTRA_CONFIGS)}: the "
        "margin loss with MarginAnnealing, lam floor 5; default: all but these two); the first is the baseline",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="SPEC",
        help="one more arm in the package's spelling, after --losses (repeatable), e.g. "
        "--arm 'as_softmax(delta=0.3)' --arm 'arcface(delta=0.1) + SkipMaskedSamples'",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small subsets, 1 epoch, 1 seed unless --seeds")
    parser.add_argument("--backbone", action="store_true", help=f"fine-tune the bundled {MINILM} encoder")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder of journal.jsonl (a rerun skips its fits), fits.csv, summary.md, compare.png"
    )
    parser.add_argument("--shard", default=None, help="i/n: run every n-th fit from the i-th on (shared --out)")
    parser.add_argument(
        "--summarize-only", action="store_true", help="fit nothing: write the tables of the fits in --out's journals"
    )
    parser.add_argument(
        "--sparse-k", type=int, default=None, help="k of sparse_softmax (default 3 on BBC News' 5 classes, else 10)"
    )
    parser.add_argument("--delta", type=float, default=0.1, help="AS-Softmax delta")
    parser.add_argument(
        "--val-per-epoch", type=int, default=None, help="validation runs per epoch (default 2, 3 with --quick)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (bag model), 16 (--backbone)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"tokens per text (default: the datamodule's; at most {BACKBONE_MAX_LENGTH} with --backbone)",
    )
    parser.add_argument("--max-batches", type=int, default=None, help="limit every split to this many batches per epoch")
    parser.add_argument(
        "--pretrained",
        default=MINILM,
        help="tokenizer and pretrained encoder (a name or a local directory; default: the bundled MiniLM)",
    )
    parser.add_argument(
        "--full-vocabulary",
        action="store_true",
        help="keep every row of the word-embedding table (same fits, slower optimizer steps)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a shared machine)")
    parser.add_argument(
        "--own-data-order",
        action="store_true",
        help="each configuration trains from the random state its own model construction leaves (how the "
        "tables of docs/results.md were made; the default gives every configuration softmax's data order)",
    )
    parser.add_argument(
        "--print-command", action="store_true", help="print the equivalent lightning-assoftmax compare command and exit"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN_CONFIGS]
    if unknown or not names:
        parser.error(f"--losses: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(KNOWN_CONFIGS)}")
    names = list(dict.fromkeys(names))
    for spec in args.arm:
        try:
            parse_arms([spec])
        except ValueError as error:
            parser.error(f"--arm {spec!r}: {error}")
        names.append(spec)
    if args.quick:
        args.epochs = 1
        args.seeds = args.seeds if args.seeds is not None else 1
        args.val_per_epoch = args.val_per_epoch if args.val_per_epoch is not None else 3
    args.seeds = 3 if args.seeds is None else args.seeds
    args.val_per_epoch = 2 if args.val_per_epoch is None else args.val_per_epoch
    if args.epochs is None:
        args.epochs = 1 if args.backbone else BAG_EPOCHS[args.data]
    if args.sparse_k is None:
        args.sparse_k = 3 if args.data == "BBCNews" else 10
    if args.batch_size is None:
        args.batch_size = 16 if args.backbone else 32
    for option in ("seeds", "epochs", "val_per_epoch", "sparse_k", "threads", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.max_batches is not None and args.max_batches < 1:
        parser.error(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    datamodule_class = DATASETS[args.data]
    if args.max_length is None:
        default = 512 if datamodule_class is BBCNews else datamodule_class.default_max_length
        args.max_length = min(default, BACKBONE_MAX_LENGTH) if args.backbone else default
    if args.max_length < 3:
        parser.error(f"--max-length must be >= 3 (room for special tokens), got {args.max_length}")
    return args, names


def main(argv: list[str] | None = None) -> CompareResult:
    args, names = parse_args(argv)
    if args.print_command:
        print(equivalent_command(args, names))
        return CompareResult([], [], "")
    # With two threads on two shared cores every op waits for the slower thread: one thread was
    # about 3x faster per step here while another process was running.
    torch.set_num_threads(args.threads)
    arms = parse_arms([arm_spelling(name, args.sparse_k) for name in names])
    settings = {
        "data": args.data,
        "epochs": args.epochs,
        "val_per_epoch": args.val_per_epoch,
        "backbone": args.backbone,
        "quick": args.quick,
        "max_batches": args.max_batches,
        "delta": args.delta,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "pretrained": args.pretrained,
        "full_vocabulary": args.full_vocabulary,
    }
    grid = CompareGrid(
        arms, args.seed_list, args.out, settings, shard=_shard(args.shard), same_data_order=not args.own_data_order
    )
    command = "python benchmarks/compare.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.summarize_only:
        return run_compare(grid, None, command, summarize_only=True)
    # One datamodule for every fit: tokenization (cached on disk) and the split happen once.
    data = DATASETS[args.data](batch_size=args.batch_size, max_length=args.max_length, tokenizer=args.pretrained)
    data.prepare_data()
    data.setup("fit")
    args.kept_token_ids = None if args.full_vocabulary else compact_vocabulary(data)
    if args.quick:
        for split in QUICK_SIZES:
            size = len(data.datasets[split])
            data.datasets[split] = Subset(data.datasets[split], range(0, size, quick_stride(size, split)))
    description = describe(args, data)
    print(description, flush=True)
    if not args.quick:
        print(f"the same fits with the package's command:\n  {equivalent_command(args, names)}", flush=True)

    def factory(arm: Arm, seed: int, callbacks: list[L.Callback]) -> FitSetup:
        model = build_model(arm, data, args)
        trainer = L.Trainer(
            **trainer_options(args),
            accelerator="auto",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        return FitSetup(model, trainer, data)

    return run_compare(grid, factory, command, description=description)


def _shard(text: str | None) -> tuple[int, int]:
    from lightning_assoftmax.compare.grid import parse_shard

    try:
        return parse_shard(text)
    except ValueError as error:
        raise SystemExit(f"compare.py: {error}") from None


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # Lightning suggests workers for in-memory data, where they would only cost time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    main()
