"""Bad configuration, table-driven: every constructor argument of the mixin, the callbacks, the
loss modules and the metric is checked early, and the message names the offending value and the fix.

Each row gives the component, the arguments, the error type, a pattern the value must appear
as, and a pattern for the fix the message suggests. A last test checks that the table covers every
constructor argument, so an argument added later without validation fails here.
"""

from __future__ import annotations

import inspect
import re

import lightning as L
import pytest
import torch
from helpers import TinyClassifier, blobs, loader, trainer
from torch import nn

from lightning_assoftmax import (
    AdaptiveGradAccumulation,
    ASSoftmaxLoss,
    ASSoftmaxMixin,
    DeltaWarmup,
    LossAccuracyCorrelation,
    MaskedSampleRatio,
    MultiLabelASSoftmaxLoss,
)


class MixinModule(ASSoftmaxMixin, L.LightningModule):
    pass


NAN, INF = float("nan"), float("inf")
DELTA_FIX = r"delta=1 keeps every class.*delta=0\.1"

# (component, kwargs, error, value as it must appear, fix)
CONSTRUCTOR_TABLE = [
    # ASSoftmaxMixin
    (MixinModule, {"delta": 1.5}, ValueError, r"got 1\.5", DELTA_FIX),
    (MixinModule, {"delta": -0.1}, ValueError, r"got -0\.1", DELTA_FIX),
    (MixinModule, {"delta": NAN}, ValueError, r"got nan", DELTA_FIX),
    (MixinModule, {"delta": "0.1"}, TypeError, r"got '0\.1'", r"a number in \[0, 1\]"),
    (MixinModule, {"loss": "arc_face"}, ValueError, r"'arc_face'", r"Known losses: softmax, t_softmax, .*as_softmax"),
    (MixinModule, {"loss": 3}, TypeError, r"got 3", r"a string, one of softmax"),
    (MixinModule, {"loss_kwargs": [("k", 1)]}, TypeError, r"\[\('k', 1\)\]", r"a mapping of keyword arguments"),
    (MixinModule, {"loss": "sparse_softmax", "loss_kwargs": {"topk": 3}}, TypeError, r"topk", r"accepts: k"),
    (MixinModule, {"loss_kwargs": {"delta": 0.2}}, ValueError, r"must not set delta", r"pass ignore_index and delta to the mixin"),
    (MixinModule, {"multilabel": "yes"}, TypeError, r"got 'yes'", r"multilabel=True for 0/1 targets"),
    (MixinModule, {"multilabel": True, "loss": "sparsemax"}, ValueError, r"loss='sparsemax'", r"use one of as_softmax, softmax"),
    (MixinModule, {"ignore_index": -100.5}, TypeError, r"got -100\.5", r"default is -100"),
    # AdaptiveGradAccumulation
    (AdaptiveGradAccumulation, {"lam": 0.0}, ValueError, r"got 0\.0", r"lam=1"),
    (AdaptiveGradAccumulation, {"lam": -1}, ValueError, r"got -1", r"lam=1"),
    (AdaptiveGradAccumulation, {"lam": INF}, ValueError, r"got inf", r"positive finite number"),
    (AdaptiveGradAccumulation, {"lam": "1"}, TypeError, r"got '1'", r"a positive number"),
    (AdaptiveGradAccumulation, {"max_accumulate_grad_batches": 0}, ValueError, r"got 0", r"max_accumulate_grad_batches=1 to never accumulate"),
    (AdaptiveGradAccumulation, {"max_accumulate_grad_batches": 2.0}, TypeError, r"got 2\.0", r"an integer >= 1"),
    (AdaptiveGradAccumulation, {"max_accumulate_grad_batches": True}, TypeError, r"got True", r"an integer >= 1"),
    # the deprecated name of max_accumulate_grad_batches (it warns, then checks the same way)
    (AdaptiveGradAccumulation, {"max_steps": 0}, ValueError, r"max_steps must be >= 1.*got 0", r"max_steps=1 to never accumulate"),
    (AdaptiveGradAccumulation, {"max_steps": 3, "max_accumulate_grad_batches": 4}, TypeError, r"max_steps=3", r"pass only max_accumulate_grad_batches"),
    # DeltaWarmup
    (DeltaWarmup, {"warmup_fraction": -0.1}, ValueError, r"got -0\.1", r"use 0 for no warm-up"),
    (DeltaWarmup, {"warmup_fraction": 1.5}, ValueError, r"got 1\.5", r"use 0 for no warm-up"),
    (DeltaWarmup, {"warmup_fraction": "0.1"}, TypeError, r"got '0\.1'", r"a number in \[0, 1\]"),
    (DeltaWarmup, {"start_delta": 1.5}, ValueError, r"got 1\.5", r"default 1 starts as plain softmax"),
    (DeltaWarmup, {"start_delta": NAN}, ValueError, r"got nan", r"default 1 starts as plain softmax"),
    (DeltaWarmup, {"start_delta": "1"}, TypeError, r"got '1'", r"a number in \[0, 1\]"),
    # LossAccuracyCorrelation
    (LossAccuracyCorrelation, {"loss_key": None}, TypeError, r"got None", r"a non-empty metric name such as 'val/loss'"),
    (LossAccuracyCorrelation, {"ce_loss_key": 3}, TypeError, r"got 3", r"a non-empty metric name"),
    (LossAccuracyCorrelation, {"acc_key": ""}, TypeError, r"got ''", r"a non-empty metric name"),
    (LossAccuracyCorrelation, {"min_points": 1}, ValueError, r"got 1", r"an integer >= 2.*default is 3"),
    (LossAccuracyCorrelation, {"min_points": 2.5}, ValueError, r"got 2\.5", r"an integer >= 2"),
    (LossAccuracyCorrelation, {"save_figure": "no"}, TypeError, r"got 'no'", r"save_figure=False"),
    (LossAccuracyCorrelation, {"figure_filename": ""}, TypeError, r"got ''", r"a non-empty file name"),
    # The loss modules and the metric
    (ASSoftmaxLoss, {"delta": 2}, ValueError, r"got 2\.0", DELTA_FIX),
    (ASSoftmaxLoss, {"ignore_index": "-100"}, TypeError, r"got '-100'", r"default is -100"),
    (ASSoftmaxLoss, {"reduction": "avg"}, ValueError, r"got 'avg'", r"one of \('mean', 'sum', 'none'\)"),
    (MultiLabelASSoftmaxLoss, {"delta": -1}, ValueError, r"got -1\.0", DELTA_FIX),
    (MultiLabelASSoftmaxLoss, {"reduction": None}, ValueError, r"got None", r"one of \('mean', 'sum', 'none'\)"),
    (MaskedSampleRatio, {"delta": 1.01}, ValueError, r"got 1\.01", DELTA_FIX),
    (MaskedSampleRatio, {"ignore_index": None}, TypeError, r"got None", r"default is -100"),
    (MaskedSampleRatio, {"multilabel": 1}, TypeError, r"got 1", r"multilabel=True for 0/1 targets"),
]


def _row_id(row) -> str:
    component, kwargs, *_ = row
    return f"{component.__name__}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}"


def assert_names_value_and_fix(message: str, value: str, fix: str) -> None:
    assert re.search(value, message), f"the value ({value}) is not named in: {message}"
    assert re.search(fix, message, flags=re.DOTALL), f"no fix ({fix}) in: {message}"


@pytest.mark.parametrize(("component", "kwargs", "error", "value", "fix"), CONSTRUCTOR_TABLE, ids=map(_row_id, CONSTRUCTOR_TABLE))
def test_constructor_refuses_with_value_and_fix(component, kwargs, error, value, fix):
    with pytest.raises(error) as info:
        component(**kwargs)
    assert_names_value_and_fix(str(info.value), value, fix)


COMPONENTS = [
    ASSoftmaxMixin,
    AdaptiveGradAccumulation,
    DeltaWarmup,
    LossAccuracyCorrelation,
    ASSoftmaxLoss,
    MultiLabelASSoftmaxLoss,
    MaskedSampleRatio,
]


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.__name__)
def test_the_table_covers_every_constructor_argument(component):
    parameters = inspect.signature(component.__init__).parameters.values()
    arguments = {p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    covered = {
        name
        for row_component, kwargs, *_ in CONSTRUCTOR_TABLE
        if issubclass(row_component, component)
        for name in kwargs
    }
    assert arguments <= covered, f"{component.__name__}: no bad-value row for {sorted(arguments - covered)}"


def test_mixin_listed_after_lightning_module_is_refused_at_class_creation():
    with pytest.raises(TypeError) as info:

        class Wrong(L.LightningModule, ASSoftmaxMixin):
            pass

    assert_names_value_and_fix(str(info.value), r"Wrong", r"class Wrong\(ASSoftmaxMixin, L\.LightningModule\)")


# -- configuration refused when fit starts ------------------------------------------------------------
class NoMixin(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


FIT_TABLE = [
    ("AdaptiveGradAccumulation without counts", NoMixin, AdaptiveGradAccumulation, TypeError,
     r"NoMixin\.training_step has no 'masked_count' and 'valid_count' \(it has \['loss'\]\)",
     r"\"masked_count\": masked.*loss_and_stats.*class NoMixin\(ASSoftmaxMixin, L\.LightningModule\).*self\.as_softmax_loss"),
    ("DeltaWarmup without the mixin", NoMixin, DeltaWarmup, TypeError,
     r"got NoMixin", r"class NoMixin\(ASSoftmaxMixin, L\.LightningModule\).*self\.as_softmax_loss"),
    ("LossAccuracyCorrelation without the mixin's keys", NoMixin, LossAccuracyCorrelation, RuntimeError,
     r"reads 'val/loss', 'val/ce_loss', 'val/acc'.*logged \['val_loss'\]", r"ASSoftmaxMixin\.as_softmax_loss.*LossAccuracyCorrelation\(loss_key="),
    ("DeltaWarmup with a loss that has no delta", lambda: TinyClassifier(loss="softmax"), DeltaWarmup, ValueError,
     r"loss='softmax'", r"Remove the callback.*loss='as_softmax'"),
]


@pytest.mark.parametrize(("case", "module", "callback", "error", "value", "fix"), FIT_TABLE, ids=[row[0] for row in FIT_TABLE])
def test_fit_refuses_a_misconfigured_bundle_with_value_and_fix(case, module, callback, error, value, fix):
    data = blobs(32)
    with pytest.raises(error) as info:
        trainer(max_epochs=1, callbacks=[callback()], num_sanity_val_steps=0).fit(module(), loader(data), loader(data))
    message = info.value.args[0] if error is KeyError else str(info.value)
    assert_names_value_and_fix(message, value, fix)
