"""Two-process DDP (CPU, gloo) with ``SkipMaskedSamples``: both ranks rest the same samples, each
gets its shard of the live ones, and the run finishes.

The run is a subprocess under ``timeout``, so a deadlock (ranks with different numbers of batches,
or a collective reached by one rank only) fails the test instead of hanging it. Each rank writes
which dataset indices its batches held and which samples the callback had live in each epoch.
Checkpoints are written every few steps: the callback sums the flags over the ranks when its
state is saved, a collective that must not hang either.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EPOCHS, N, BATCH = 6, 75, 8


def _worker(out_dir: str) -> None:
    import lightning as L
    import torch
    from helpers import blobs
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_assoftmax import ASSoftmaxMixin, SkipMaskedSamples

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)

    class Indexed(ASSoftmaxMixin, L.LightningModule):
        def __init__(self):
            super().__init__(delta=0.1)
            self.net = nn.Linear(8, 4)
            self.seen: dict[int, list[int]] = {}

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            self.seen.setdefault(self.trainer.current_epoch, []).extend(idx.tolist())
            return self.as_softmax_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorder(L.Callback):
        def __init__(self, skipping):
            self.skipping = skipping
            self.live: dict[int, list[int]] = {}

        def on_train_epoch_start(self, trainer, pl_module):
            mask = self.skipping.live_mask
            self.live[trainer.current_epoch] = torch.nonzero(mask).flatten().tolist()

        def on_train_end(self, trainer, pl_module):
            result = {
                "seen": pl_module.seen,
                "live": self.live,
                "summary": self.skipping.summary(),
                "weights": torch.cat([p.detach().flatten() for p in pl_module.parameters()]).tolist(),
            }
            Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))

    data = blobs(N, seed=2)
    data = TensorDataset(*data.tensors, torch.arange(N))
    skipping = SkipMaskedSamples(max_rest=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[skipping, Recorder(skipping), ModelCheckpoint(dirpath=Path(out_dir, "ckpt"), every_n_train_steps=3, save_top_k=-1)],
    )
    trainer.fit(Indexed(), DataLoader(data, batch_size=BATCH, shuffle=True))


def run_ddp(tmp_path: Path, seconds: int = 150) -> list[dict]:
    tests = str(Path(__file__).parent)
    src = str(Path(__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, tests, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
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


@pytest.mark.slow
def test_two_processes_rest_the_same_samples_and_share_the_live_ones(tmp_path):
    rank0, rank1 = run_ddp(tmp_path)
    assert rank0["live"] == rank1["live"], "both ranks rest the same samples"
    assert rank0["summary"] == rank1["summary"]
    resting = [N - len(rank0["live"][str(e)]) for e in range(EPOCHS)]
    assert resting[0] == 0 and max(resting) > N // 3 and resting[-1] == 0
    for epoch in range(EPOCHS):
        live = set(rank0["live"][str(epoch)])
        seen0, seen1 = rank0["seen"][str(epoch)], rank1["seen"][str(epoch)]
        # the same number of batches on both ranks; together they cover exactly the live set
        # (DistributedSampler pads the shorter shard with a repeat)
        assert len(seen0) == len(seen1) == -(-len(live) // 2)
        assert set(seen0) | set(seen1) == live
        assert len(set(seen0) & set(seen1)) <= 1
    assert rank0["weights"] == rank1["weights"]
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) >= 5


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
