"""Two-process DDP (CPU, gloo) with ``TokenClassifier(head="adaptive")`` and the default
``strategy="ddp"``: tail clusters without targets on a process (one of them on every process, all
run long) still get a (zero) gradient there, so DDP's reducer finds every parameter ready and no
``find_unused_parameters`` is needed.

The run is a subprocess under ``timeout`` (a rank waiting for a gradient that never comes would
hang). Each rank writes its weights; the test compares the ranks and checks that the cluster no
target ever reaches kept its initial weights while the others learnt.
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

V = 40
CUTOFFS = [5, 15, 30]  # shortlist 0-4, tail clusters 5-14, 15-29, 30-39


def _batches(rank_bias: int, n: int = 32) -> list[dict[str, torch.Tensor]]:
    """Ids below 30 only (the last tail cluster is never a target); the samples of the odd
    positions (rank 1's shard) use the shortlist and the first tail cluster only."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        high = 15 if i % 2 == rank_bias else 30
        ids = torch.randint(0, high, (9,), generator=g)
        items.append({"input_ids": ids[:-1], "labels": ids[1:]})
    return items


def _worker(out_dir: str) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_assoftmax.models import TokenClassifier

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = TokenClassifier(
        num_classes=V, vocab_size=V, embed_dim=8, hidden_dim=16, dropout=0.0, lr=0.01, delta=0.2,
        head="adaptive", head_kwargs={"cutoffs": CUTOFFS, "div_value": 2.0},
    )
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    class Record(L.Callback):
        def on_train_end(self, trainer, pl_module):
            state = pl_module.state_dict()
            result = {
                "weights": {k: v.tolist() for k, v in state.items()},
                "unchanged": {k: bool(torch.equal(v, initial[k])) for k, v in state.items()},
                "steps": trainer.global_step,
            }
            Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Record()],
    )
    items = _batches(rank_bias=1)
    trainer.fit(model, DataLoader(items, batch_size=4), DataLoader(items, batch_size=4))


@pytest.mark.slow
def test_adaptive_head_under_ddp_with_the_default_strategy(tmp_path):
    src = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    seconds = 150
    command = ["timeout", "-k", "10", str(seconds), sys.executable, __file__, "--worker", str(tmp_path)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the 2-process DDP run hung")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"DDP run failed (rc={proc.returncode}):\n{text[-4000:]}"
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 8
    for name, value in rank0["weights"].items():
        torch.testing.assert_close(torch.tensor(value), torch.tensor(rank1["weights"][name]), msg=name)
    unchanged = rank0["unchanged"]
    # Cluster 2 (classes 30-39) never sees a target: zero gradients leave it where it started.
    assert unchanged["output.tail.2.0.weight"] and unchanged["output.tail.2.1.weight"]
    assert not unchanged["output.tail.0.1.weight"] and not unchanged["output.tail.1.1.weight"]
    assert not unchanged["output.head.weight"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
