"""The ``compare`` subcommand of ``lightning-assoftmax``: the ``fit`` configuration plus a grid.

``CompareSubcommand`` is a ``LightningCLI`` mixin (list it before ``LightningCLI``): the
``compare`` parser holds every argument of ``fit`` (config files, ``--model``, ``--data``,
``--trainer``, optimizer) and the grid's own options; each fit instantiates the parsed
configuration again, with the arm's loss, as ``fit`` would.
"""

from __future__ import annotations

import copy
import inspect
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

from lightning_assoftmax.callbacks import LossAccuracyCorrelation
from lightning_assoftmax.compare.api import run_compare
from lightning_assoftmax.compare.arms import Arm, parse_arms
from lightning_assoftmax.compare.grid import CompareGrid, FitSetup, check_fit_setup, parse_shard
from lightning_assoftmax.mixin import MULTILABEL_LOSSES, ASSoftmaxMixin

__all__ = ["COMPARE_HELP", "CompareSubcommand"]

COMPARE_HELP = "Train every arm (a loss, its keywords, its callbacks) once per seed and compare them paired by seed."
# The grid's own options: not part of a fit's settings.
_GRID_OPTIONS = ("arms", "seeds", "out", "shard", "summarize_only", "monitor", "mode", "same_data_order")
# Callbacks that write files or need a logger; compare keeps each fit's best weights in memory
# and records the validation history itself.
_DROPPED_CALLBACKS = (ModelCheckpoint, ProgressBar, LearningRateMonitor)


def add_compare_arguments(parser: Any) -> None:
    """The grid's options on the ``compare`` parser."""
    parser.add_argument(
        "--arms",
        type=list[str] | str,
        default="softmax,as_softmax",
        help="Arms, the first is the baseline: build_loss names, comma-separated, each optionally with "
        "keywords and '+ Callback' terms of its own, e.g. --arms softmax,as_softmax "
        "--arms+='as_softmax(delta=0.3) + SkipMaskedSamples' --arms+='arcface(scale=30, margin=0.5)'.",
    )
    parser.add_argument(
        "--seeds",
        type=int | list[int],
        default=3,
        help="Seeds per arm: a count K (seeds 0..K-1) or a list, e.g. [5, 6].",
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="Folder of the journal (one line per finished fit; a rerun skips them), fits.csv, summary.md "
        "and compare.png. Without it nothing is written and nothing can be resumed.",
    )
    parser.add_argument(
        "--shard",
        type=str | None,
        default=None,
        help="i/n: run every n-th fit of the grid from the i-th on (processes or cluster jobs sharing "
        "--out); then --summarize_only=true merges the shards.",
    )
    parser.add_argument(
        "--summarize_only",
        type=bool,
        default=False,
        help="Fit nothing: write the tables of the fits in --out's journals (all shards).",
    )
    parser.add_argument(
        "--monitor",
        type=str,
        default="val/acc",
        help="Validation metric that picks each fit's best weights (those are tested).",
    )
    parser.add_argument("--mode", type=Literal["min", "max"], default="max", help="Whether --monitor is best at its max or min.")
    parser.add_argument(
        "--same_data_order",
        type=bool,
        default=True,
        help="Every arm of a seed starts training from the random state that building the baseline's "
        "model leaves (same data order even when an arm's model draws other random numbers).",
    )


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(name=...)`` reaches a parameter ``name``, following ``**kwargs`` up the MRO."""
    for base in cls.__mro__:
        if base is object or "__init__" not in vars(base):
            continue
        parameters = inspect.signature(base.__init__).parameters.values()
        if any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters):
            return True
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return False
    return False


def check_model_for_arms(model: L.LightningModule, arms: list[Arm]) -> None:
    """Refuse, before any fit, a model the arms cannot configure."""
    cls = type(model)
    if not isinstance(model, ASSoftmaxMixin):
        raise ValueError(
            f"compare needs a model with ASSoftmaxMixin (it sets each arm's loss through the mixin); "
            f"{cls.__name__} has none: declare `class {cls.__name__}(ASSoftmaxMixin, L.LightningModule)` "
            "and compute its loss with self.as_softmax_loss(logits, target)."
        )
    missing = [name for name in ("loss", "loss_kwargs", "delta") if not _accepts(cls, name)]
    if missing:
        raise ValueError(
            f"{cls.__name__}.__init__ does not take {', '.join(missing)}: accept them (or **kwargs) and pass "
            "them on to super().__init__ (ASSoftmaxMixin), so that compare can set each arm's loss."
        )
    if model.as_softmax_multilabel:
        wrong = [arm.key for arm in arms if arm.loss not in MULTILABEL_LOSSES or arm.loss_kwargs]
        if wrong:
            raise ValueError(
                f"arm(s) {', '.join(wrong)}: a multi-label model trains only {', '.join(MULTILABEL_LOSSES)} "
                "(without keywords; as_softmax(delta=...) sets delta)."
            )


def _seed_list(seeds: int | list[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"--seeds must be a count or a list of seeds, got {seeds!r}.")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1 (or a list such as [5, 6]), got {seeds}.")
        return list(range(seeds))
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"--seeds must hold non-negative integers, got {seeds!r}.")
    return list(dict.fromkeys(seeds))


class CompareSubcommand:
    """Adds ``compare`` to a ``LightningCLI`` subclass (list this mixin first)."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        self._compare_argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        super().parse_arguments(parser, args)

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        compare_parser = self.init_parser(description=COMPARE_HELP)
        self._add_arguments(compare_parser)
        add_compare_arguments(compare_parser)
        self._subcommand_method_arguments["compare"] = []
        self._subcommand_parsers["compare"] = compare_parser
        # LightningCLI registers only Trainer methods as subcommands; compare is not one.
        parser._subcommands_action.add_subcommand("compare", compare_parser, help=COMPARE_HELP)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != "compare":
            super()._run_subcommand(subcommand)
            return
        try:
            self._compare()
        except ValueError as error:
            self._parser("compare").error(str(error))

    # -- the subcommand ----------------------------------------------------------------------
    def _fit_settings(self) -> dict[str, Any]:
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        settings = dict(dumped.get("compare", dumped))
        for key in (*_GRID_OPTIONS, "config", "seed_everything"):
            settings.pop(key, None)
        return json.loads(json.dumps(settings, default=str))

    def _compare(self) -> None:
        options = self.config["compare"]
        arms = parse_arms(options["arms"])
        seeds = _seed_list(options["seeds"])
        shard = parse_shard(options["shard"])
        out = Path(options["out"]) if options["out"] else None
        if shard[1] > 1 and out is None:
            raise ValueError("--shard needs --out (the shards share its folder, one journal each).")
        command = "lightning-assoftmax " + " ".join(shlex.quote(a) for a in self._compare_argv)
        grid = CompareGrid(
            arms,
            seeds,
            out,
            self._fit_settings(),
            monitor=options["monitor"],
            mode=options["mode"],
            shard=shard,
            same_data_order=options["same_data_order"],
        )
        if options["summarize_only"]:
            run_compare(grid, None, command, summarize_only=True)
            return
        check_model_for_arms(self.model, arms)
        data = self.datamodule
        if data is not None:
            # Once, before the seeds: every fit then starts from the same prepared data.
            data.prepare_data()
            data.setup("fit")
        check_fit_setup(FitSetup(self.model, self.trainer, data))
        if "transformers" in sys.modules:  # a pretrained model's loading bar at every fit
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        dropped = sorted({type(c).__name__ for c in self.trainer.callbacks if isinstance(c, _DROPPED_CALLBACKS)})
        if dropped:
            print(
                f"compare: each fit runs without {', '.join(dropped)} (the best weights by {grid.monitor} are kept "
                "in memory, no logger, one progress bar over the grid)",
                file=sys.stderr,
            )
        if getattr(self, "_default_stop", False):
            print(
                f"compare: no stopping point given, each fit stops after {self.trainer.max_epochs} epochs "
                "(set --trainer.max_epochs, --trainer.max_steps or --trainer.max_time).",
                file=sys.stderr,
            )
        run_compare(grid, self._compare_factory, command)

    def _compare_factory(self, arm: Arm, seed: int, callbacks: list[L.Callback]) -> FitSetup:
        """The arm's fit, instantiated from the parsed configuration as ``fit`` would."""
        config = copy.deepcopy(self.config)
        init_args = config["compare"]["model"]["init_args"]
        init_args["loss"] = arm.loss
        init_args["loss_kwargs"] = dict(arm.loss_kwargs) or None
        if arm.delta is not None:
            init_args["delta"] = arm.delta
        config_init = self.parser.instantiate_classes(config)
        self.config_init = config_init
        self.model = config_init["compare"]["model"]
        self._add_configure_optimizers_method_to_model("compare")
        trainer_config = dict(config_init["compare"]["trainer"])
        configured = trainer_config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        extra = [config_init["compare"][key] for key in self._parser("compare").callback_keys]
        trainer_config.update(
            callbacks=[c for c in [*configured, *extra] if not isinstance(c, _DROPPED_CALLBACKS)] + callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        for callback in trainer_config["callbacks"]:
            if isinstance(callback, LossAccuracyCorrelation):
                callback.save_figure = False  # one figure per fit into the working directory otherwise
        if getattr(self, "_default_stop", False):
            # No stopping point configured: the same default epochs as `fit` (set on self.trainer).
            trainer_config["max_epochs"] = self.trainer.max_epochs
        trainer = self.trainer_class(**trainer_config)
        return FitSetup(self.model, trainer, self.datamodule)
