"""The grid of a comparison: which fits, in which order, their journal, and one fit.

A grid is every ``(arm, seed)`` pair. Seed by seed, every arm trains from the same seed, with the
order of the arms rotated by one per seed (load changes on the machine hit every arm alike). The
journal (``journal.jsonl`` in the output folder, one JSON line per finished fit, written as it
ends) makes a grid resumable: a rerun skips the fits it holds. ``shard=(i, n)`` runs every n-th
fit of the grid order from the i-th on, into a journal of its own; the summary merges them all.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_assoftmax.compare.arms import Arm
from lightning_assoftmax.compare.recorder import FitRecorder, PredictionCapture
from lightning_assoftmax.compare.stats import correlation
from lightning_assoftmax.mixin import ASSoftmaxMixin

__all__ = ["CompareGrid", "FitSetup", "check_fit_setup", "parse_shard", "read_journals"]

#: What must agree between two copies of one fit found in two journals.
SAME_FIT = ("best_val", "test_acc", "optimizer_steps")


@dataclass
class FitSetup:
    """What a factory hands the grid for one fit: a fresh model and Trainer (holding the
    callbacks it was given), and the datamodule (``None``: the model's own dataloaders)."""

    model: L.LightningModule
    trainer: L.Trainer
    datamodule: L.LightningDataModule | None = None


#: ``factory(arm, seed, callbacks)``: called right after ``seed_everything(seed)``; builds the
#: arm's model (its loss and keywords), then a Trainer with ``callbacks`` among its callbacks.
FitFactory = Callable[[Arm, int, list[L.Callback]], FitSetup]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (``1 <= i <= n``) -> ``(i, n)``; ``None`` -> ``(1, 1)``."""
    if text is None:
        return 1, 1
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 2/4), got {text!r}.") from None
    if not 1 <= index <= count:
        raise ValueError(f"--shard {text}: i must lie in 1..n (1/{count} .. {count}/{count}).")
    return index, count


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def settings_differences(journal: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: <journal value> in the journal, <current value> now"`` per differing setting."""
    old, new = _flatten(journal), _flatten(current)
    return [
        f"{key}: {old.get(key, '(unset)')!r} in the journal, {new.get(key, '(unset)')!r} now"
        for key in sorted(set(old) | set(new))
        if old.get(key, "(unset)") != new.get(key, "(unset)")
    ]


def read_journals(folder: Path, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The fits of every ``journal*.jsonl`` in ``folder`` (shards included), each once.

    With ``settings``, a fit recorded under other settings is refused, naming the settings that
    differ. A fit found in two journals counts once when both copies agree and is refused when
    they do not (the fits are seeded: other results mean other code or settings).
    """
    fits: dict[tuple[str, int], dict[str, Any]] = {}
    sources: dict[tuple[str, int], Path] = {}
    for journal in sorted(folder.glob("journal*.jsonl")):
        for number, line in enumerate(journal.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                fit = json.loads(line)
            except json.JSONDecodeError:
                # A line cut short by a killed process: that fit will run again.
                print(f"compare: skipping an unreadable line {number} of {journal}", file=sys.stderr)
                continue
            if settings is not None and fit.get("settings") != settings:
                differences = settings_differences(fit.get("settings", {}), settings)
                raise ValueError(
                    f"{journal} holds fits of another configuration ({'; '.join(differences)}). "
                    "Use another --out, or rerun with the journal's settings."
                )
            key = (fit["arm"], fit["seed"])
            if key in fits:
                if any(fits[key].get(k) != fit.get(k) for k in SAME_FIT):
                    raise ValueError(
                        f"the fit {fit['arm']!r} seed {fit['seed']} is in both {sources[key]} and {journal} "
                        f"with different results ({', '.join(f'{k} {fits[key].get(k)} vs {fit.get(k)}' for k in SAME_FIT)}); "
                        "remove one of them."
                    )
                continue
            fits[key], sources[key] = fit, journal
    return list(fits.values())


def _rng_state() -> dict[str, Any]:
    import random

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _data_source(setup: FitSetup) -> Any:
    return setup.datamodule if setup.datamodule is not None else setup.model


def has_test_data(setup: FitSetup) -> bool:
    """Whether the datamodule (or the model, without one) defines a test dataloader."""
    source = _data_source(setup)
    base = L.LightningDataModule if setup.datamodule is not None else L.LightningModule
    return is_overridden("test_dataloader", source, base) and setup.trainer.limit_test_batches != 0


def check_fit_setup(setup: FitSetup, arm: Arm | None = None) -> None:
    """Refuse, with the fix, a model without ``ASSoftmaxMixin``, a model that did not take the
    arm's loss, no validation data, or a Trainer on several processes."""
    model = setup.model
    if not isinstance(model, ASSoftmaxMixin):
        raise ValueError(
            f"compare needs a model with ASSoftmaxMixin (it chooses each arm's loss through the mixin); "
            f"{type(model).__name__} has none: declare it as `class {type(model).__name__}(ASSoftmaxMixin, "
            "L.LightningModule)` and compute its loss with self.as_softmax_loss(logits, target)."
        )
    if arm is not None and (
        model.as_softmax_loss_name != arm.loss
        or dict(model.as_softmax_loss_kwargs) != arm.loss_kwargs
        or (arm.delta is not None and model.as_softmax_target_delta != arm.delta)
    ):
        raise ValueError(
            f"{type(model).__name__} was built with loss={model.as_softmax_loss_name!r}, "
            f"loss_kwargs={model.as_softmax_loss_kwargs!r}, delta={model.as_softmax_target_delta} for arm "
            f"{arm.key!r}: its __init__ must pass `loss`, `loss_kwargs` and `delta` on to ASSoftmaxMixin (accept them, or **kwargs, and hand them to "
            "super().__init__)."
        )
    source = _data_source(setup)
    base = L.LightningDataModule if setup.datamodule is not None else L.LightningModule
    if not is_overridden("val_dataloader", source, base):
        raise ValueError(
            f"compare selects each fit's best weights by a validation metric, but {type(source).__name__} "
            "has no val_dataloader: give the datamodule a validation split."
        )
    trainer = setup.trainer
    if trainer.limit_val_batches == 0:
        raise ValueError(
            "compare selects each fit's best weights by a validation metric, but "
            "trainer.limit_val_batches is 0: let validation run (e.g. --trainer.limit_val_batches=1.0)."
        )
    if trainer.world_size > 1:
        raise ValueError(
            f"compare runs each fit in one process (got world size {trainer.world_size}); use one device "
            "per fit and --shard i/n to run parts of the grid side by side."
        )


class CompareGrid:
    """Every arm trained once per seed, paired by seed, recorded in a journal.

    Args:
        arms: the arms, the first is the baseline.
        seeds: the seeds (each arm trains once per seed).
        out: folder of the journal; ``None`` keeps the fits in memory only.
        settings: everything that defines a fit besides its arm and seed (the model, data and
            trainer configuration): a journal written under other settings is refused.
        monitor, mode: the validation metric that picks each fit's best weights.
        shard: ``(i, n)``: run every n-th fit of the grid order from the i-th on.
        same_data_order: every arm of a seed starts training from the random state that
            building the baseline arm's model leaves, so that it sees the baseline's data order
            (and dropout draws) even when its model draws other random numbers at construction
            (another output layer); False: each arm from the state its own construction leaves.
    """

    def __init__(
        self,
        arms: list[Arm],
        seeds: Iterable[int],
        out: Path | str | None = None,
        settings: dict[str, Any] | None = None,
        monitor: str = "val/acc",
        mode: str = "max",
        shard: tuple[int, int] = (1, 1),
        same_data_order: bool = True,
    ) -> None:
        if not arms:
            raise ValueError("a comparison needs at least one arm (the first is the baseline).")
        self.arms = list(arms)
        self.seeds = list(dict.fromkeys(int(s) for s in seeds))
        if not self.seeds:
            raise ValueError("a comparison needs at least one seed.")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.out = Path(out) if out is not None else None
        self.monitor, self.mode = monitor, mode
        self.shard = shard
        self.same_data_order = same_data_order
        self.settings = {
            **(settings or {}),
            "monitor": monitor,
            "mode": mode,
            "same_data_order": same_data_order,
        }
        self.fits: list[dict[str, Any]] = []
        self._baseline_states: dict[int, dict[str, Any]] = {}

    # -- the plan -------------------------------------------------------------------------------
    @property
    def arm_keys(self) -> list[str]:
        return [arm.key for arm in self.arms]

    def order(self) -> list[tuple[Arm, int]]:
        """The grid order: seed by seed, the arms rotated by ``seed % len(arms)``."""
        plan = []
        for seed in self.seeds:
            shift = seed % len(self.arms)
            plan.extend((arm, seed) for arm in self.arms[shift:] + self.arms[:shift])
        return plan

    def my_share(self) -> list[tuple[Arm, int]]:
        index, count = self.shard
        return [item for position, item in enumerate(self.order()) if position % count == index - 1]

    @property
    def journal_path(self) -> Path | None:
        if self.out is None:
            return None
        index, count = self.shard
        return self.out / ("journal.jsonl" if count == 1 else f"journal-shard-{index}-of-{count}.jsonl")

    def load(self) -> list[dict[str, Any]]:
        """The fits of this grid already in the output folder's journals (all shards)."""
        if self.out is None or not self.out.is_dir():
            return []
        wanted = {(arm.key, seed) for arm, seed in self.order()}
        fits = read_journals(self.out, self.settings)
        return [f for f in fits if (f["arm"], f["seed"]) in wanted]

    # -- running ----------------------------------------------------------------------------------
    def run(self, factory: FitFactory, progress: bool = True) -> list[dict[str, Any]]:
        """Run the fits of this share that the journals lack; returns every fit of the grid found
        (this run's and the journals'), in grid order."""
        self.fits = self.load()
        done = {(f["arm"], f["seed"]) for f in self.fits}
        todo = [(arm, seed) for arm, seed in self.my_share() if (arm.key, seed) not in done]
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        bar = _progress(len(self.my_share()), len(self.my_share()) - len(todo), progress)
        # Lightning's per-fit notices (devices, "max_epochs reached") would bury the grid's bar.
        quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        try:
            for arm, seed in todo:
                if bar is not None:
                    bar.set_description(f"seed {seed} {arm.key}")
                fit = self.run_fit(factory, arm, seed)
                self.fits.append(fit)
                if self.journal_path is not None:
                    with self.journal_path.open("a") as handle:
                        handle.write(json.dumps(fit, allow_nan=True) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"last: {self.monitor} {fit['best_val']:.4f}, test acc {fit['test_acc']:.4f}")
        finally:
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)
            if bar is not None:
                bar.close()
        return self.sorted_fits()

    def sorted_fits(self) -> list[dict[str, Any]]:
        rank = {key: i for i, key in enumerate(self.arm_keys)}
        return sorted(self.fits, key=lambda f: (rank.get(f["arm"], len(rank)), f["seed"]))

    def _baseline_state(self, factory: FitFactory, seed: int) -> dict[str, Any]:
        """The random state that building the baseline arm's fit for ``seed`` leaves."""
        if seed not in self._baseline_states:
            seed_everything(seed, verbose=False)
            factory(self.arms[0], seed, [])
            self._baseline_states[seed] = _rng_state()
        return self._baseline_states[seed]

    def run_fit(self, factory: FitFactory, arm: Arm, seed: int) -> dict[str, Any]:
        """Train ``arm`` with ``seed``, evaluate its best weights; the journal record."""
        baseline_state = None
        if self.same_data_order and arm.key != self.arm_keys[0]:
            baseline_state = self._baseline_state(factory, seed)
        recorder = FitRecorder(self.monitor, self.mode)
        seed_everything(seed, verbose=False)
        setup = factory(arm, seed, [recorder, *arm.build_callbacks()])
        if arm.key == self.arm_keys[0]:
            self._baseline_states.setdefault(seed, _rng_state())
        if baseline_state is not None:
            _set_rng_state(baseline_state)
        check_fit_setup(setup, arm)
        model, trainer, data = setup.model, setup.trainer, setup.datamodule
        trainer.fit(model, datamodule=data) if data is not None else trainer.fit(model)
        if recorder.best_state is None:
            raise ValueError(
                f"the fit of arm {arm.key!r}, seed {seed} ran no validation with a finite {self.monitor!r}: "
                "check trainer.val_check_interval / check_val_every_n_epoch against max_epochs."
            )
        model.load_state_dict(recorder.best_state)
        capture = PredictionCapture()
        trainer.callbacks.append(capture)
        on_test = has_test_data(setup)
        evaluate = trainer.test if on_test else trainer.validate
        if data is not None:
            evaluate(model, datamodule=data, verbose=False)
        else:
            evaluate(model, verbose=False)
        scores = capture.scores(model.as_softmax_multilabel)
        return self._record(arm, seed, recorder, trainer, scores, "test" if on_test else "val")

    def _record(
        self, arm: Arm, seed: int, recorder: FitRecorder, trainer: L.Trainer, scores: dict[str, Any], split: str
    ) -> dict[str, Any]:
        points = recorder.points
        best = recorder.best_point
        ce = [p["ce_loss"] for p in points]
        finite_ce = [i for i, v in enumerate(ce) if math.isfinite(v)]
        lowest = min(finite_ce, key=ce.__getitem__) if finite_ce else None
        record: dict[str, Any] = {
            "arm": arm.key,
            "seed": seed,
            "loss": arm.loss,
            "loss_kwargs": arm.loss_kwargs,
            "delta": arm.delta,
            "callbacks": [spec.text() for spec in arm.callbacks],
            "evaluated_on": split,
            "best_val": best["monitor"],
            "best_step": best["step"],
            "best_epoch": best["epoch"],
            "best_seconds": best["seconds"],
            "test_acc": scores["acc"],
            "test_macro_f1": scores["macro_f1"],
            "train_seconds": recorder.train_seconds,
            "train_cpu_seconds": recorder.train_cpu_seconds,
            "optimizer_steps": int(trainer.global_step),
            "train_batches": recorder.batches,
            "final_masked_ratio": recorder.final_masked_ratio,
        }
        for method in ("pearson", "spearman"):
            for key in ("loss", "ce_loss"):
                record[f"{method}_val_{key}_acc"] = correlation(points, key, method)
                record[f"{method}_val_{key}_acc_after_epoch_1"] = correlation(points, key, method, 1.0)
        record["val_ce_min"] = ce[lowest] if lowest is not None else math.nan
        record["val_ce_min_epoch"] = points[lowest]["epoch"] if lowest is not None else math.nan
        record["val_ce_final"] = ce[-1]
        record["validation_runs"] = points
        record["test_predictions"] = scores["predictions"]
        record["test_labels"] = scores["targets"]
        record["settings"] = self.settings
        return record


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # smoothing=0: the ETA from the mean time per fit of this run (fits of a grid differ a lot)
    return tqdm(total=total, initial=done, unit="fit", file=sys.stderr, dynamic_ncols=True, smoothing=0.0)
