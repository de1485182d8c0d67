"""Two-process DDP (CPU, gloo) with the whole bundle: the ready-made ``TextClassifier`` (which uses
the mixin) on BBC News, with DeltaWarmup, AdaptiveGradAccumulation and LossAccuracyCorrelation.

The run is a subprocess under ``timeout``, so a deadlock (ranks that disagree on when to step or to
communicate) fails the test instead of hanging it. Each rank writes what it saw; the test checks
the ranks against each other and the logged validation values against a recomputation from the
model's logits on both ranks' validation shards (pooled, as the metrics claim to be).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import reference_as_softmax

DELTA = 0.1
EPOCHS = 4


# -- the distributed run (executed by the subprocess, once per rank) -----------------------------------
def _worker(out_dir: str) -> None:
    import lightning as L

    from lightning_assoftmax import AdaptiveGradAccumulation, DeltaWarmup, LossAccuracyCorrelation
    from lightning_assoftmax.data import BBCNews
    from lightning_assoftmax.models import TextClassifier

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)

    # BBC News, articles cut to 64 tokens. A quarter of the validation labels are ignored
    # (-100), all of them in rank 1's shard (Lightning's DistributedSampler gives rank 1 the odd
    # indices), so the ranks count different numbers of valid samples: the mean of the two ranks'
    # ratios is then not the ratio over their union.
    data = BBCNews(batch_size=16, max_length=64, cache_dir=str(Path(out_dir, "cache")))
    data.setup("fit")
    data.datasets["val"].labels[1::4] = -100
    # The bag-of-embeddings model on the bundled MiniLM word embeddings (frozen, so a step is cheap);
    # no dropout, so the logits recomputed below are the ones validation saw.
    model = TextClassifier(
        num_classes=data.num_classes, vocab_size=data.vocab_size, freeze_embeddings=True,
        hidden_dim=64, dropout=0.0, lr=0.02, delta=DELTA,
    )

    class Recorder(L.Callback):
        """Listed after the bundle: what this rank saw and what was logged."""

        def __init__(self, correlation, accumulation):
            self.correlation, self.accumulation = correlation, accumulation
            self.batches: list[list] = []
            self.val_batches: list = []
            self.validations: list[dict] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append(
                [trainer.current_epoch, batch_idx, trainer.global_step, trainer.accumulate_grad_batches, pl_module.as_softmax_delta]
            )

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.val_batches.append(batch)

        def on_validation_end(self, trainer, pl_module):
            batches, self.val_batches = self.val_batches, []
            if trainer.sanity_checking:
                return
            with torch.no_grad():
                logits = [pl_module(b["input_ids"], b["attention_mask"]) for b in batches]
            metrics = trainer.callback_metrics
            self.validations.append(
                {
                    "logits": torch.cat(logits).tolist(),
                    "target": torch.cat([b["labels"] for b in batches]).tolist(),
                    "logged": {k: float(v) for k, v in metrics.items() if k.startswith("val/")},
                }
            )

        def on_train_end(self, trainer, pl_module):
            result = {
                "batches": self.batches,
                "validations": self.validations,
                "history": self.correlation.history,
                "correlations": self.correlation.correlations,
                "summary": self.accumulation.summary(),
                "weights": torch.cat([p.detach().flatten() for p in pl_module.parameters() if p.requires_grad]).tolist(),
            }
            Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))

    correlation = LossAccuracyCorrelation(save_figure=False)
    accumulation = AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        limit_train_batches=24,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=[DeltaWarmup(warmup_fraction=0.3), accumulation, correlation, Recorder(correlation, accumulation)],
    )
    trainer.fit(model, data)


# -- the test ------------------------------------------------------------------------------------------------
def run_ddp(tmp_path: Path, seconds: int = 150) -> list[dict]:
    src = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = ["timeout", "-k", "10", str(seconds), sys.executable, __file__, "--worker", str(tmp_path)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the 2-process DDP run hung (deadlock?)")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"DDP run failed or timed out (rc={proc.returncode}):\n{text[-4000:]}"
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def pooled_reference(validations: list[dict]) -> dict[str, float]:
    """Validation values over the union of the ranks' samples, from their logits (SPEC section 2)."""
    logits = torch.tensor([row for v in validations for row in v["logits"]])
    target = torch.tensor([t for v in validations for t in v["target"]])
    valid = target != -100
    rows = reference_as_softmax(logits, target, DELTA, reduction="none")
    n = int(valid.sum())
    return {
        "val/masked_ratio": int(((rows == 0) & valid).sum()) / n,
        "val/loss": float(rows.sum()) / n,
        "val/ce_loss": float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")) / n,
        "val/acc": int(((logits.argmax(1) == target) & valid).sum()) / n,
    }


def local_ratio(validation: dict) -> float:
    logits, target = torch.tensor(validation["logits"]), torch.tensor(validation["target"])
    valid = target != -100
    rows = reference_as_softmax(logits, target, DELTA, reduction="none")
    return int(((rows == 0) & valid).sum()) / int(valid.sum())


@pytest.mark.slow
def test_two_process_ddp_run_with_the_whole_bundle(tmp_path):
    rank0, rank1 = run_ddp(tmp_path)

    # Identical windows and deltas at every batch on both ranks (same steps, no deadlock),
    # and windows that actually grew.
    assert rank0["batches"] == rank1["batches"]
    assert max(b[3] for b in rank0["batches"]) >= 2
    deltas = [b[4] for b in rank0["batches"]]
    assert deltas[0] == 1.0 and deltas[-1] == pytest.approx(DELTA)
    assert rank0["summary"] == rank1["summary"]
    assert rank0["summary"]["optimizer_steps"] < rank0["summary"]["plain_optimizer_steps"]

    # Logged validation values are those of the union of both ranks' validation shards.
    assert len(rank0["validations"]) == len(rank1["validations"]) == EPOCHS
    distinguishes = False
    for v0, v1 in zip(rank0["validations"], rank1["validations"], strict=True):
        assert v0["logged"] == v1["logged"]
        want = pooled_reference([v0, v1])
        for key, value in want.items():
            assert v0["logged"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        naive = (local_ratio(v0) + local_ratio(v1)) / 2
        distinguishes |= abs(naive - want["val/masked_ratio"]) > 1e-3
    assert distinguishes, "the ranks' shards should make a mean of per-rank ratios differ from the pooled one"

    # Correlations: the same history and values on both ranks, built from the pooled values.
    assert rank0["history"] == rank1["history"]
    assert rank0["correlations"] == rank1["correlations"]
    assert sorted(rank0["correlations"]) == sorted(
        ["val/loss_acc_pearson", "val/ce_loss_acc_pearson", "val/loss_acc_spearman", "val/ce_loss_acc_spearman"]
    )
    for record, v0 in zip(rank0["history"], rank0["validations"], strict=True):
        for role in ("loss", "ce_loss", "acc"):
            assert record[role] == pytest.approx(v0["logged"][f"val/{role}"], rel=1e-6)

    torch.testing.assert_close(torch.tensor(rank0["weights"]), torch.tensor(rank1["weights"]))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
