"""AdaptiveGradAccumulation: exact per-window gradients under Lightning, window rules, resume, DDP.

Every optimizer step is recorded from inside the optimizer (after Lightning's closure, the
callback's tail rescaling and gradient clipping) and checked against a plain-PyTorch recomputation:
a forward/backward of each micro-batch on the weights it was seen with, averaged over the
micro-batches between two recorded steps, with an AS-Softmax loss written here from its definition.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import EpochSeededLoader
from helpers import trainer as base_trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from lightning_assoftmax import AdaptiveGradAccumulation, ASSoftmaxLoss, ASSoftmaxMixin
from lightning_assoftmax.functional import as_softmax_loss_and_stats

torch.set_num_threads(1)

N_FEATURES, N_CLASSES = 8, 4


# -- an independent reference ---------------------------------------------------------------------
def reference_as_softmax_rows(logits: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Per-row AS-Softmax loss from SPEC section 2: CE of the target over the kept classes only."""
    z = logits.float()
    with torch.no_grad():
        p = z.softmax(dim=1)
        p_target = p.gather(1, target[:, None])
        keep = (p_target - p) <= delta
        keep.scatter_(1, target[:, None], True)
    kept = z.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(kept, dim=1) - z.gather(1, target[:, None]).squeeze(1)


def reference_masked_count(logits: torch.Tensor, target: torch.Tensor, delta: float) -> int:
    return int((reference_as_softmax_rows(logits.detach(), target, delta) == 0).sum())


def expected_window_size(masked_ratio: float, current: int, lam: float, max_steps: int) -> int:
    """SPEC section 3, restated: k = min(max(round_half_even(lam / (1 - rho)), k), k + 1, max_steps)."""
    wanted = math.inf if masked_ratio >= 1 else max(1, round(lam / (1 - masked_ratio)))
    return int(min(max(wanted, current), current + 1, max_steps))


# -- tiny model and data ---------------------------------------------------------------------------
def cluster_data(n: int, seed: int = 0, spread: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: the masked ratio rises within the first epoch, yet stays below 1 (so every
    window keeps a non-zero gradient that a wrong window boundary would change)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(1234)) * spread
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, N_FEATURES, generator=g)
    return x, y


class RecordingSGD(torch.optim.SGD):
    """SGD that records, at every step, the weights it starts from, the gradient it applies and the lr."""

    def __init__(self, params, lr: float, log: list):
        super().__init__(params, lr=lr)
        self.log = log

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        params = [p for group in self.param_groups for p in group["params"]]
        self.log.append(
            {
                "params": [p.detach().clone() for p in params],
                "grads": [p.grad.detach().clone() for p in params],
                "lr": self.param_groups[0]["lr"],
            }
        )
        super().step()
        return loss


class TinyClassifier(ASSoftmaxMixin, L.LightningModule):
    def __init__(
        self,
        delta: float = 0.1,
        lr: float = 0.3,
        hidden: int = 16,
        net: nn.Module | None = None,
        step_lr_gamma: float | None = None,
        nan_loss_at: tuple[int, ...] = (),
    ):
        super().__init__(delta=delta)
        torch.manual_seed(0)
        self.net = net or nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, N_CLASSES))
        self.lr = lr
        self.step_lr_gamma = step_lr_gamma
        self.nan_loss_at = set(nan_loss_at)
        self.step_log: list = []
        self.train_batches = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.as_softmax_loss(self(x), y)
        if self.train_batches in self.nan_loss_at:
            # A NaN loss value with finite gradients (the NaN term is a constant).
            loss = loss + torch.tensor(float("nan"))
        self.train_batches += 1
        return loss

    def configure_optimizers(self):
        optimizer = RecordingSGD(self.parameters(), lr=self.lr, log=self.step_log)
        if self.step_lr_gamma is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.step_lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class BatchRecorder(L.Callback):
    """Listed after AdaptiveGradAccumulation: sees each batch, the weights it meets and the live k."""

    def __init__(self):
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.batches.append(
            {
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "last": batch_idx + 1 == trainer.num_training_batches,
                "x": x.clone(),
                "y": y.clone(),
                "k": trainer.accumulate_grad_batches,
                "params": [p.detach().clone() for p in pl_module.parameters()],
                "steps_before": len(pl_module.step_log),
            }
        )


def make_trainer(tmp_path, callbacks, max_epochs=3, **kwargs):
    defaults = dict(num_sanity_val_steps=0, default_root_dir=tmp_path, deterministic=True)
    defaults.update(kwargs)
    return base_trainer(max_epochs=max_epochs, callbacks=callbacks, **defaults)


def windows(recorder: BatchRecorder, model: TinyClassifier) -> list[list[dict]]:
    """Group the recorded batches by the optimizer step that followed them."""
    groups: list[list[dict]] = [[] for _ in model.step_log]
    for b in recorder.batches:
        groups[b["steps_before"]].append(b)
    return groups


def reference_window_grad(model: TinyClassifier, window: list[dict], delta: float, autocast: bool = False):
    """Mean over the window's micro-batches of each micro-batch's mean-loss gradient (plain PyTorch)."""
    total = None
    for b in window:
        params = [p.clone().requires_grad_(True) for p in b["params"]]
        names = [n for n, _ in model.named_parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (b["x"],))
        loss = reference_as_softmax_rows(logits, b["y"], delta).mean()
        grads = torch.autograd.grad(loss, params)
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads, strict=True)]
    return [t / len(window) for t in total]


def check_gradient_invariant(model, recorder, delta, atol=1e-6, rtol=1e-5, clip_norm=None, autocast=False):
    groups = windows(recorder, model)
    assert len(groups) == len(model.step_log) > 0
    for step, (window, record) in enumerate(zip(groups, model.step_log, strict=True)):
        assert window, f"step {step} had no micro-batch"
        for b in window:  # the weights do not move inside a window
            for p_seen, p_step in zip(b["params"], record["params"], strict=True):
                torch.testing.assert_close(p_seen, p_step, rtol=0, atol=0)
        expected = reference_window_grad(model, window, delta, autocast=autocast)
        if clip_norm is not None:  # torch.nn.utils.clip_grad_norm_'s documented rule
            total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
            expected = [g * min(1.0, clip_norm / (float(total_norm) + 1e-6)) for g in expected]
        for got, want in zip(record["grads"], expected, strict=True):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, s=step: f"step {s}: {m}")
    return groups


def fit_recorded(tmp_path, *, n=100, batch_size=8, epochs=3, lam=1.0, max_steps=2, delta=0.1, module_kwargs=None, **trainer_kwargs):
    x, y = cluster_data(n)
    model = TinyClassifier(delta=delta, **(module_kwargs or {}))
    callback = AdaptiveGradAccumulation(lam=lam, max_accumulate_grad_batches=max_steps)
    recorder = BatchRecorder()
    trainer = make_trainer(tmp_path, [callback, recorder], max_epochs=epochs, **trainer_kwargs)
    trainer.fit(model, EpochSeededLoader(x, y, batch_size))
    return model, callback, recorder, trainer


def simulate_windows(model, recorder, delta, lam, max_steps):
    """The window sizes SPEC section 3 prescribes for the recorded run, batch by batch."""
    groups = windows(recorder, model)
    step_after = {id(window[-1]) for window in groups}
    k, pending, masked, valid = 1, None, 0, 0
    expected = []
    for b in recorder.batches:
        if pending is not None and b["batch_idx"] % k == 0 and b["batch_idx"] % pending == 0:
            k, pending = pending, None
        expected.append(k)
        names = [n for n, _ in model.named_parameters()]
        with torch.no_grad():
            logits = torch.func.functional_call(model, dict(zip(names, b["params"], strict=True)), (b["x"],))
        masked += reference_masked_count(logits, b["y"], delta)
        valid += len(b["y"])
        if id(b) in step_after:
            nxt = expected_window_size(masked / valid, k, lam, max_steps)
            if nxt > k:
                pending = nxt
            masked, valid = 0, 0
    return expected


# -- the invariant ------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_steps", [2, 3])
def test_every_step_is_the_mean_gradient_of_exactly_its_window(tmp_path, max_steps):
    # 100 samples in batches of 8: 13 batches per epoch (the last one of 4 samples), so windows of
    # 2 or 3 leave a short tail each epoch, and k=3 must wait for batch indices divisible by 3.
    model, callback, recorder, _ = fit_recorded(tmp_path, epochs=3, max_steps=max_steps)
    groups = check_gradient_invariant(model, recorder, delta=0.1)

    sizes = [len(w) for w in groups]
    tails = [w for w in groups if w[-1]["last"] and len(w) < w[-1]["k"]]
    assert tails, f"no short epoch tail was exercised: window sizes {sizes}"
    assert max(b["k"] for b in recorder.batches) == max_steps
    # Steps happen exactly where Lightning's modulo rule with the live k puts them.
    for window in groups:
        end = window[-1]
        assert (end["batch_idx"] + 1) % end["k"] == 0 or end["last"]
        assert window[0]["batch_idx"] % window[0]["k"] == 0
        assert len({b["k"] for b in window}) == 1
    # The window sizes are the ones the rule gives for the masked ratios seen (reference mask).
    assert [b["k"] for b in recorder.batches] == simulate_windows(model, recorder, 0.1, 1.0, max_steps)
    assert callback.summary()["optimizer_steps"] == len(model.step_log)
    assert callback.summary()["plain_optimizer_steps"] == len(recorder.batches)


def test_window_sizes_start_at_one_never_shrink_grow_by_one_and_are_capped(tmp_path):
    model, callback, recorder, trainer = fit_recorded(tmp_path, epochs=4, max_steps=3)
    ks = [b["k"] for b in recorder.batches]
    assert ks[0] == 1
    assert all(0 <= b - a <= 1 for a, b in zip(ks, ks[1:], strict=False)), ks
    assert max(ks) == 3 and ks[-1] == 3  # easy data reaches the cap
    assert callback.accumulate_grad_batches == 3
    assert trainer.callback_metrics["train/accumulate_grad_batches"] == 3
    summary = callback.summary()
    assert summary["optimizer_steps"] < summary["plain_optimizer_steps"] == 4 * 13
    assert sum(summary["window_sizes"].values()) == summary["optimizer_steps"]
    assert trainer.accumulate_grad_batches == 1  # handed back to the Trainer as configured


def test_plain_softmax_never_accumulates(tmp_path):
    model, callback, recorder, _ = fit_recorded(tmp_path, epochs=2, delta=1.0, max_steps=4)
    assert {b["k"] for b in recorder.batches} == {1}
    assert len(model.step_log) == len(recorder.batches) == 26


def test_tail_rescaling_happens_before_gradient_clipping(tmp_path):
    model, _, recorder, _ = fit_recorded(
        tmp_path, epochs=3, max_steps=3, gradient_clip_val=0.05, gradient_clip_algorithm="norm"
    )
    groups = check_gradient_invariant(model, recorder, delta=0.1, clip_norm=0.05)
    assert any(len(w) < w[-1]["k"] for w in groups)


def test_lr_scheduler_steps_once_per_optimizer_step(tmp_path):
    model, _, recorder, _ = fit_recorded(tmp_path, epochs=3, module_kwargs={"step_lr_gamma": 0.9})
    check_gradient_invariant(model, recorder, delta=0.1)
    lrs = [r["lr"] for r in model.step_log]
    assert lrs == pytest.approx([0.3 * 0.9**i for i in range(len(lrs))])
    assert len(lrs) < len(recorder.batches)


def test_bf16_mixed_on_cpu(tmp_path):
    model, _, recorder, _ = fit_recorded(tmp_path, epochs=3, precision="bf16-mixed")
    check_gradient_invariant(model, recorder, delta=0.1, autocast=True, atol=1e-3, rtol=1e-2)
    assert max(b["k"] for b in recorder.batches) == 2


# -- scripted masked ratios -------------------------------------------------------------------------
def confident_model(delta: float, nan_loss_at=()) -> TinyClassifier:
    """A frozen (lr=0) linear model giving p ~ 1 to the class of a one-hot input: a sample is masked
    exactly when its label is that class, so a loader fixes each batch's masked ratio."""
    net = nn.Linear(N_CLASSES, N_CLASSES)
    with torch.no_grad():
        net.weight.copy_(10 * torch.eye(N_CLASSES))
        net.bias.zero_()
    return TinyClassifier(delta=delta, lr=0.0, net=net, nan_loss_at=nan_loss_at)


def scripted_loader(masked_per_batch, batch_size=4, ignore_batches=()):
    """Batch b holds ``masked_per_batch[b]`` correctly labelled (masked) samples, the rest mislabelled."""
    xs, ys = [], []
    for b, masked in enumerate(masked_per_batch):
        cls = (torch.arange(batch_size) + b) % N_CLASSES
        label = torch.where(torch.arange(batch_size) < masked, cls, (cls + 1) % N_CLASSES)
        if b in ignore_batches:
            label = torch.full_like(label, -100)
        xs.append(F.one_hot(cls, N_CLASSES).float())
        ys.append(label)
    return EpochSeededLoader(torch.cat(xs), torch.cat(ys), batch_size, shuffle=False)


def test_scripted_ratios_give_the_hand_computed_windows(tmp_path):
    # Masked samples per batch of 4. Window ratios: b2 -> 0.5 (k_raw 2): pending 2, applied at
    # b4 (b3 is odd); {4,5} -> 0.25 (k_raw 1): stays 2; {6,7} -> 0.75 (k_raw 4, capped 3): pending 3,
    # not at b8/b10 (not multiples of 3) nor at b9 (inside the window {8,9}): applied at b12; the
    # epoch's 16th batch is a tail of one in a window of 3.
    masked = [0, 1, 2, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    model = confident_model(0.1)
    recorder = BatchRecorder()
    callback = AdaptiveGradAccumulation(max_accumulate_grad_batches=3)
    trainer = make_trainer(tmp_path, [callback, recorder], max_epochs=2)
    trainer.fit(model, scripted_loader(masked))
    ks = [b["k"] for b in recorder.batches]
    assert ks == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3] + [3] * 16
    groups = check_gradient_invariant(model, recorder, delta=0.1)
    assert [len(w) for w in groups] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 1] + [3] * 5 + [1]
    assert callback.summary()["window_sizes"] == {1: 6, 2: 4, 3: 6}


@pytest.mark.parametrize("case", ["nan_loss", "no_valid_samples", "normal"])
def test_nan_or_empty_window_keeps_its_size(tmp_path, case):
    # Every sample masked; batches 0-2 have a NaN loss or only ignored targets, so the windows
    # they end must not grow.
    model = confident_model(0.1, nan_loss_at=(0, 1, 2) if case == "nan_loss" else ())
    loader = scripted_loader([4] * 8, ignore_batches=(0, 1, 2) if case == "no_valid_samples" else ())
    recorder = BatchRecorder()
    trainer = make_trainer(tmp_path, [AdaptiveGradAccumulation(max_accumulate_grad_batches=2), recorder], max_epochs=1)
    trainer.fit(model, loader)
    ks = [b["k"] for b in recorder.batches]
    if case == "normal":
        assert ks == [1, 1, 2, 2, 2, 2, 2, 2]  # decided after batch 0, aligned at batch 2
    else:
        assert ks == [1, 1, 1, 1, 2, 2, 2, 2]  # decided after batch 3, aligned at batch 4


# -- a module without the mixin ------------------------------------------------------------------------
class CountsModule(L.LightningModule):
    """No mixin: ``training_step`` returns the loss with its masked and valid counts, from the
    ``ASSoftmaxLoss`` module or from the functional API."""

    def __init__(self, source: str, delta: float = 0.1, lr: float = 0.3, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, N_CLASSES))
        self.source, self.delta, self.lr = source, delta, lr
        self.criterion = ASSoftmaxLoss(delta)
        self.step_log: list = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.source == "module":
            loss, masked, valid = self.criterion.loss_and_stats(self(x), y)
        else:
            loss, masked, valid = as_softmax_loss_and_stats(self(x), y, self.delta)
        return {"loss": loss, "masked_count": masked, "valid_count": valid}

    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=self.lr, log=self.step_log)


@pytest.mark.parametrize("source", ["module", "functional"])
def test_a_module_without_the_mixin_that_returns_the_counts(tmp_path, source):
    x, y = cluster_data(100)
    model, recorder = CountsModule(source), BatchRecorder()
    callback = AdaptiveGradAccumulation(max_accumulate_grad_batches=3)
    make_trainer(tmp_path, [callback, recorder], max_epochs=3).fit(model, EpochSeededLoader(x, y, 8))
    groups = check_gradient_invariant(model, recorder, delta=0.1)
    assert max(b["k"] for b in recorder.batches) == 3
    assert any(len(w) < w[-1]["k"] for w in groups)  # a short epoch tail was rescaled
    assert [b["k"] for b in recorder.batches] == simulate_windows(model, recorder, 0.1, 1.0, 3)
    assert callback.summary()["optimizer_steps"] == len(model.step_log) < len(recorder.batches)


def test_training_step_counts_reads_the_output_first_then_the_mixin():
    from lightning_assoftmax.callbacks.step_outputs import training_step_counts

    plain, mixin = PlainModule(), TinyClassifier()
    counts = {"loss": torch.tensor(0.5), "masked_count": torch.tensor(3), "valid_count": torch.tensor(8)}
    assert training_step_counts(plain, counts) == (counts["masked_count"], counts["valid_count"])
    assert training_step_counts(plain, {"loss": torch.tensor(0.5)}) is None
    mixin.as_softmax_last_stats = (torch.tensor(1), torch.tensor(4))
    assert training_step_counts(mixin, {"loss": torch.tensor(0.5)}) is mixin.as_softmax_last_stats
    assert training_step_counts(mixin, counts)[1] is counts["valid_count"]
    with pytest.raises(TypeError, match=r"masked_count=tensor\(3\.\).*0-dim integer tensor.*loss_and_stats"):
        training_step_counts(plain, {**counts, "masked_count": torch.tensor(3.0)})


# -- reuse across fits -------------------------------------------------------------------------------
def test_a_reused_instance_starts_each_fresh_fit_at_one_with_zero_counters(tmp_path):
    callback = AdaptiveGradAccumulation(max_accumulate_grad_batches=2)
    x, y = cluster_data(100)
    first = TinyClassifier()
    make_trainer(tmp_path / "a", [callback], max_epochs=3).fit(first, EpochSeededLoader(x, y, 8))
    assert callback.accumulate_grad_batches == 2  # the first fit grew the window

    x, y = cluster_data(36 * 4, seed=1)
    model, recorder = TinyClassifier(), BatchRecorder()
    make_trainer(tmp_path / "b", [callback, recorder], max_epochs=1).fit(model, EpochSeededLoader(x, y, 4))
    assert recorder.batches[0]["k"] == 1
    assert [b["k"] for b in recorder.batches] == simulate_windows(model, recorder, 0.1, 1.0, 2)
    check_gradient_invariant(model, recorder, delta=0.1)
    summary = callback.summary()
    assert summary["plain_optimizer_steps"] == len(recorder.batches) == 36
    assert summary["optimizer_steps"] == len(model.step_log)
    assert sum(size * count for size, count in summary["window_sizes"].items()) == 36


def test_a_reused_instance_resumed_from_a_checkpoint_continues_its_state(tmp_path):
    x, y = cluster_data(100)

    def run(root, epochs, callback, ckpt_path=None):
        model, recorder = TinyClassifier(step_lr_gamma=0.97), KRecorder()
        trainer = make_trainer(root, [callback, recorder], max_epochs=epochs)
        trainer.fit(model, EpochSeededLoader(x, y, 8), ckpt_path=ckpt_path)
        return model, recorder, trainer

    full_model, full, _ = run(tmp_path / "full", 4, AdaptiveGradAccumulation(max_accumulate_grad_batches=3))
    callback = AdaptiveGradAccumulation(max_accumulate_grad_batches=3)
    _, first, first_trainer = run(tmp_path / "a", 2, callback)
    first_trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved = callback.summary()
    run(tmp_path / "other", 1, callback)  # an unrelated fresh fit in between
    second_model, second, _ = run(tmp_path / "b", 4, callback, ckpt_path=tmp_path / "a.ckpt")
    assert first.ks + second.ks == full.ks
    assert callback.summary()["plain_optimizer_steps"] == 4 * 13
    assert callback.summary()["optimizer_steps"] - saved["optimizer_steps"] == len(second_model.step_log)
    for a, b in zip(second_model.parameters(), full_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": 0.0}, ValueError, "lam must be a positive finite number, got 0.0"),
        ({"lam": -1}, ValueError, "got -1"),
        ({"lam": float("nan")}, ValueError, "got nan"),
        ({"lam": float("inf")}, ValueError, "got inf"),
        ({"lam": True}, TypeError, "lam"),
        ({"max_accumulate_grad_batches": 0}, ValueError, "max_accumulate_grad_batches must be >= 1.*got 0"),
        ({"max_accumulate_grad_batches": 2.0}, TypeError, "max_accumulate_grad_batches must be an integer"),
        ({"max_steps": 3, "max_accumulate_grad_batches": 4}, TypeError, "pass only max_accumulate_grad_batches"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveGradAccumulation(**kwargs)


def test_max_steps_is_a_deprecated_name_of_the_cap(tmp_path):
    with pytest.warns(FutureWarning, match=r"max_steps=\.\.\.\) is deprecated.*max_accumulate_grad_batches=3"):
        callback = AdaptiveGradAccumulation(max_steps=3)
    assert callback.max_accumulate_grad_batches == 3
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="max_steps must be >= 1"):
        AdaptiveGradAccumulation(max_steps=0)
    # It still caps the window, and a checkpoint written with the old key still loads.
    x, y = cluster_data(100)
    recorder = BatchRecorder()
    make_trainer(tmp_path, [callback, recorder], max_epochs=4).fit(TinyClassifier(), EpochSeededLoader(x, y, 8))
    assert max(b["k"] for b in recorder.batches) == 3
    state = callback.state_dict()
    state["max_steps"] = state.pop("max_accumulate_grad_batches")
    resumed = AdaptiveGradAccumulation(max_accumulate_grad_batches=3)
    resumed.load_state_dict(state)  # no warning: same cap
    assert resumed.state_dict() == callback.state_dict()


def small_fit(tmp_path, model=None, callbacks=None, **trainer_kwargs):
    x, y = cluster_data(16)
    trainer = make_trainer(tmp_path, callbacks or [AdaptiveGradAccumulation()], max_epochs=1, **trainer_kwargs)
    trainer.fit(model or TinyClassifier(), EpochSeededLoader(x, y, 8))
    return trainer


class ManualModel(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


class PlainModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(N_FEATURES, N_CLASSES)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AccumulatingStrategy(SingleDeviceStrategy):
    """Stands in for DeepSpeed (not installed here): a strategy that accumulates in its own engine."""

    @property
    def handles_gradient_accumulation(self) -> bool:
        return True


class ChangesAccumulation(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            trainer.accumulate_grad_batches = 4


def test_manual_optimization_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="automatic optimization.*automatic_optimization = False"):
        small_fit(tmp_path, model=ManualModel())


def test_strategy_that_accumulates_itself_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="AccumulatingStrategy.*DeepSpeed"):
        small_fit(tmp_path, strategy=AccumulatingStrategy(device=torch.device("cpu")))


def test_trainer_accumulate_grad_batches_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Trainer\(accumulate_grad_batches=3\).*max_accumulate_grad_batches"):
        small_fit(tmp_path, accumulate_grad_batches=3)


def test_gradient_accumulation_scheduler_is_refused(tmp_path):
    callbacks = [AdaptiveGradAccumulation(), GradientAccumulationScheduler({1: 2})]
    with pytest.raises(ValueError, match="GradientAccumulationScheduler and AdaptiveGradAccumulation"):
        small_fit(tmp_path, callbacks=callbacks)


def test_module_without_counts_is_refused_at_its_first_batch(tmp_path):
    class CountBatches(L.Callback):
        batches = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            CountBatches.batches += 1

    callbacks = [AdaptiveGradAccumulation(), CountBatches()]
    match = r"PlainModule.training_step has no 'masked_count'.*\['loss'\].*loss_and_stats.*ASSoftmaxMixin"
    with pytest.raises(TypeError, match=match):
        small_fit(tmp_path, model=PlainModule(), callbacks=callbacks)
    assert CountBatches.batches == 0  # raised at the end of the first batch


def test_someone_else_changing_accumulation_is_refused(tmp_path):
    callbacks = [AdaptiveGradAccumulation(), ChangesAccumulation()]
    with pytest.raises(RuntimeError, match="changed to 4 .*had set 1"):
        small_fit(tmp_path, callbacks=callbacks)


# -- logging -------------------------------------------------------------------------------------------
def test_end_of_fit_summary_is_reported(tmp_path, caplog):
    x, y = cluster_data(100)
    callback = AdaptiveGradAccumulation()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    with caplog.at_level("INFO"):
        trainer.fit(TinyClassifier(), EpochSeededLoader(x, y, 8))
    steps = trainer.global_step
    assert steps < 26
    assert f"{steps} optimizer steps over 26 training batches (a plain run takes 26)" in caplog.text
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train/accumulate_grad_batches", "train/optimizer_steps", "train/plain_optimizer_steps"} <= set(rows[0])
    logged_k = [float(r["train/accumulate_grad_batches"]) for r in rows if r["train/loss_step"]]
    assert len(logged_k) == steps  # every optimizer step's row carries the window size
    assert logged_k[0] == 1 and logged_k[-1] == 2 and logged_k == sorted(logged_k)
    (final,) = [r for r in rows if r["train/optimizer_steps"]]
    assert (float(final["train/optimizer_steps"]), float(final["train/plain_optimizer_steps"])) == (steps, 26)


# -- resume ----------------------------------------------------------------------------------------------
class KRecorder(L.Callback):
    def __init__(self):
        self.ks: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ks.append((trainer.current_epoch, batch_idx, trainer.accumulate_grad_batches))


# Resuming from every kind of checkpoint: tests/test_resume_sweep.py.


@pytest.mark.filterwarnings("ignore:.*this checkpoint was taken inside an accumulation window")
def test_state_dict_round_trip_keeps_pending_and_open_window():
    callback = AdaptiveGradAccumulation(max_accumulate_grad_batches=3)
    state = {
        "lam": 1.0,
        "max_accumulate_grad_batches": 3,
        "accumulate_grad_batches": 2,
        "pending": 3,
        "window_batches": 1,
        "window_counts": [5, 8, 0],
        "optimizer_steps": 7,
        "micro_batches": 11,
        "window_sizes": {1: 3, 2: 4},
        "window_gradients": {"net.weight": torch.ones(2, 3)},
    }
    callback.load_state_dict(state)
    assert callback.accumulate_grad_batches == 2 and callback.pending_accumulate_grad_batches == 3
    saved = callback.state_dict()
    assert saved.pop("window_gradients").keys() == {"net.weight"}
    assert saved == {k: v for k, v in state.items() if k != "window_gradients"}
    # a checkpoint of an earlier version, without gradients
    legacy = {k: v for k, v in state.items() if k != "window_gradients"}
    with pytest.warns(UserWarning, match="holds no gradients"):
        AdaptiveGradAccumulation(max_accumulate_grad_batches=3).load_state_dict(legacy)
    smaller = AdaptiveGradAccumulation(max_accumulate_grad_batches=1)
    with pytest.warns(UserWarning, match="max_accumulate_grad_batches=1 from a checkpoint made with lam=1.0, max_accumulate_grad_batches=3"):
        smaller.load_state_dict(state)
    assert smaller.pending_accumulate_grad_batches == 1  # shrinks at the next aligned batch


# -- benchmark -------------------------------------------------------------------------------------------
def test_benchmark_quick_smoke(monkeypatch):
    path = Path(__file__).parents[1] / "benchmarks" / "as_speed_digits.py"
    spec = importlib.util.spec_from_file_location("as_speed_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    table = benchmark.main(["--quick"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"AS-Softmax + AdaptiveGradAccumulation", "AS-Softmax", "softmax (delta=1)"}
    steps, batches = (int(v) for v in rows["AS-Softmax + AdaptiveGradAccumulation"])
    assert steps < batches
    assert [int(v) for v in rows["softmax (delta=1)"]] == [batches, batches]


# -- DDP --------------------------------------------------------------------------------------------------
def _ddp_worker(out_dir: str) -> None:
    """Run by the DDP test in a subprocess (rank 0; Lightning starts rank 1 with the same command)."""
    # Even samples are easy clusters, odd samples carry random labels; the unshuffled
    # DistributedSampler gives rank 0 the even ones and rank 1 the odd ones.
    x, y = cluster_data(200)
    y[1::2] = torch.randint(0, N_CLASSES, (100,), generator=torch.Generator().manual_seed(7))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)

    class LocalRecorder(L.Callback):
        def __init__(self):
            self.rows = []
            self.window = [0, 0]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masked, valid = pl_module.as_softmax_last_stats
            self.window = [self.window[0] + int(masked), self.window[1] + int(valid)]
            stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches
            self.rows.append([trainer.current_epoch, batch_idx, trainer.accumulate_grad_batches, stepped, *self.window])
            if stepped:
                self.window = [0, 0]

    recorder = LocalRecorder()
    model = TinyClassifier(lr=0.2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AdaptiveGradAccumulation(max_accumulate_grad_batches=3), recorder],
    )
    trainer.fit(model, loader)
    rank = trainer.global_rank
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rows": recorder.rows, "weights": weights}))


@pytest.mark.slow
def test_ddp_ranks_with_different_data_choose_the_same_windows(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    command = ["timeout", "-k", "10", "240", sys.executable, __file__, "--ddp-worker", str(tmp_path)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the 2-process DDP run hung (deadlock?)")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"DDP run failed or timed out (rc={proc.returncode}):\n{text[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows0, rows1 = ranks[0]["rows"], ranks[1]["rows"]
    assert [r[:4] for r in rows0] == [r[:4] for r in rows1]  # same k at every batch, same steps
    assert max(r[2] for r in rows0) >= 2
    # The ranks' own masked ratios differ: deciding per rank would have split the windows.
    window_ends = [(a, b) for a, b in zip(rows0, rows1, strict=True) if a[3]]
    local = [(a[4] / a[5], b[4] / b[5]) for a, b in window_ends]
    assert any(abs(r0 - r1) > 0.3 for r0, r1 in local)
    # The pooled ratio is what the windows follow (SPEC rule restated, alignment included).
    k, pending = 1, None
    for a, b in zip(rows0, rows1, strict=True):
        if pending is not None and a[1] % k == 0 and a[1] % pending == 0:
            k, pending = pending, None
        assert a[2] == k
        if a[3]:
            nxt = expected_window_size((a[4] + b[4]) / (a[5] + b[5]), k, 1.0, 3)
            pending = nxt if nxt > k else pending
    torch.testing.assert_close(torch.tensor(ranks[0]["weights"]), torch.tensor(ranks[1]["weights"]))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ddp-worker":
    _ddp_worker(sys.argv[2])
