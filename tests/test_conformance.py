"""Conformance: every public loss entry point against a plain float64 reference.

Built like PyTorch's OpInfo: :data:`ENTRIES` lists each entry point once, with how to call it on a
:class:`Case` and a float64 reference written from the math (``tests/reference.py``, torch's own
functions, the ``entmax`` package, torch's ``AdaptiveLogSoftmaxWithLoss``); generic tests then run
the whole table across precisions (float32, float64, bfloat16, float16 inputs; bfloat16 / float16
``torch.autocast`` on CPU, and on CUDA when present), target layouts (contiguous, a strided column,
expanded, int32, with and without ignored positions), logits layouts (contiguous, transposed,
channel-second), implementations (the torch op; the Triton kernel through ``TRITON_INTERPRET=1``),
reductions and ``ignore_index`` values. Values, gradients of every input and the masked-sample
counts are compared; the reference's masked samples follow the paper (only the target kept, in
float64 of the input values).

Rows whose keep decision lies within rounding of the margin are moved off it when a case is built
(another target, else ignored), so that a lower precision cannot flip a decision and the
comparison stays exact in what it asserts. The last section ports peers' test cases with
``delta >= 1``, where AS-Softmax is cross entropy.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax import (
    ASSoftmaxLoss,
    ASSoftmaxMixin,
    LinearASSoftmaxLoss,
    MultiLabelASSoftmaxLoss,
    build_loss,
    classifier_head,
)
from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    as_softmax_keep_mask,
    as_softmax_loss_and_stats,
    linear_as_softmax_cross_entropy,
    linear_as_softmax_loss_and_stats,
    masked_sample_ratio,
    multilabel_as_softmax_loss,
    multilabel_as_softmax_loss_and_stats,
)
from lightning_assoftmax.heads import build_head
from tests.reference import (
    MARGIN_KWARGS,
    reference_as_softmax,
    reference_keep_mask,
    reference_margin_logits,
    reference_multilabel,
    reference_multilabel_masked,
    reference_single_label_masked,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HAS_ENTMAX = importlib.util.find_spec("entmax") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None

M, C, D = 12, 7, 5  # rows, classes, hidden features
N, SEQ = 4, 3  # token cases: (N, C, SEQ) logits, N * SEQ = M rows
DELTA = 0.3
LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: (rtol, atol) of values and gradients (relative to the gradient's largest entry) per dtype.
TOL = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}
#: How far (in probability) from the margin a keep decision must be for each dtype.
DECISION_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 0.06, torch.float16: 0.01}


# --------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One call: the leaves (inputs that take a gradient), the module owning further parameters
    (a head), the target and the call's settings."""

    leaves: dict[str, Tensor]
    target: Tensor
    delta: float
    ignore_index: int
    reduction: str
    module: nn.Module | None = None
    logits_layout: str = "contiguous"
    target_layout: str = "contiguous"

    def params(self) -> list[Tensor]:
        return list(self.leaves.values()) + ([] if self.module is None else list(self.module.parameters()))

    def plain_target(self) -> Tensor:
        """The target's values as a contiguous int64 tensor (what the reference reads)."""
        return self.target.long().contiguous()

    def as_float64(self) -> Case:
        leaves = {k: v.detach().double().requires_grad_() for k, v in self.leaves.items()}
        module = None if self.module is None else copy.deepcopy(self.module).double()
        return Case(leaves, self.plain_target(), self.delta, self.ignore_index, self.reduction, module)


@dataclass(frozen=True)
class Out:
    loss: Tensor
    masked: Tensor | None = None  # count of masked samples (0-dim)


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # logits | tokens | multilabel | linear | head | margin
    run: Callable[[Case], Out]
    reference: Callable[[Case], Out]
    reductions: tuple[str, ...] = ("mean", "sum", "none")
    ignore_indices: tuple[int, ...] = (-100, 0)
    masked: bool = True
    triton: bool = False  # reaches the single-label rows op (the Triton kernel on CUDA)
    config: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def _target_layout(target: Tensor, layout: str) -> Tensor:
    if layout == "strided":  # labels[..., 0] of labels with a second column
        return torch.stack([target, torch.full_like(target, 1)], -1)[..., 0]
    if layout == "expanded":  # one class broadcast over every position (stride 0)
        return torch.full((1,) * target.dim(), 2, dtype=target.dtype).expand(target.shape)
    if layout == "int32":
        return target.int()
    return target


def _logits_view(z: Tensor, layout: str) -> Tensor:
    """The leaf ``z`` (its values) in another memory layout, differentiable back to ``z``."""
    if layout == "transposed":  # class-major memory, a non-contiguous (M, C) view
        return z.t().contiguous().t()
    if layout == "channel_last_view":  # (N, C, L) as the transpose of (N, L, C) memory
        return z.transpose(1, 2).contiguous().transpose(1, 2)
    return z


def _decision_quantities(entry: Entry, case: Case, target: Tensor) -> Tensor:
    """``(M, C)`` float64 values ``p_t - p_i`` deciding each row's keep mask for ``target`` rows."""
    p = _probs64(entry, case, target)
    safe = target.clamp(min=0)
    return p.gather(1, safe[:, None]) - p


def _probs64(entry: Entry, case: Case, target: Tensor) -> Tensor:
    ref = case.as_float64()
    with torch.no_grad():
        if entry.kind in ("logits", "tokens"):
            z = ref.leaves["z"]
            z = z.movedim(1, -1).reshape(-1, z.shape[1]) if z.dim() > 2 else z
            return torch.softmax(z, 1)
        if entry.kind == "linear":
            return torch.softmax(F.linear(ref.leaves["x"], ref.leaves["w"], ref.leaves["b"]), 1)
        if entry.kind == "head":
            return ref.module.log_prob(ref.leaves["x"]).exp()
        if entry.kind == "margin":
            name, kwargs = entry.config["loss"], entry.config["kwargs"]
            w, b = _margin_weights(ref.module)
            safe = target.clamp(min=0)
            return torch.softmax(reference_margin_logits(name, ref.leaves["x"], w, b, safe, **kwargs), 1)
    raise AssertionError(entry.kind)


def _clear_of_the_margin(entry: Entry, case: Case, dtype: torch.dtype) -> Tensor:
    """The case's flat target with every row whose decision sits within rounding of ``delta``
    moved to a clear target (the most probable class first), or ignored when none is clear."""
    target = case.target.reshape(-1).clone()
    if case.delta >= 1.0:  # p_t - p_i <= 1 always: nothing to decide
        return target
    margin = DECISION_MARGIN[dtype]
    p = _probs64(entry, case, target)
    order = p.argsort(1, descending=True)
    for row in range(len(target)):
        if target[row] == case.ignore_index:
            continue
        for candidate in [int(target[row])] + order[row].tolist():
            if candidate == case.ignore_index:
                continue
            trial = target.clone()
            trial[row] = candidate
            gap = _decision_quantities(entry, case, trial)[row]
            near = ((gap - case.delta).abs() < margin)
            near[candidate] = False
            if not near.any():
                target[row] = candidate
                break
        else:
            target[row] = case.ignore_index
    return target


def make_case(entry: Entry, dtype: torch.dtype, *, reduction: str = "mean", ignore_index: int = -100,
              ignored: bool = True, delta: float = DELTA, target_layout: str = "contiguous",
              logits_layout: str = "contiguous", seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (M,), generator=g)
    module = None
    confident = torch.arange(M) % 3 == 0
    if entry.kind in ("logits", "tokens"):
        z = torch.randn(M, C, generator=g, dtype=torch.float64) * 2.0
        z[confident, target[confident]] += 15.0  # masked at delta < 1
        z[1, target[1]] += 40.0  # so confident that its float32 cross entropy rounds to 0
        leaves = {"z": z}
    elif entry.kind == "multilabel":
        z = torch.randn(M, C, generator=g, dtype=torch.float64) * 3.0
        labels = (torch.rand(M, C, generator=g) < 0.3).double()
        labels[0] = 0.0  # a row without positives keeps all its negatives
        labels[confident] = F.one_hot(target[confident], C).double()
        z[confident] = torch.where(labels[confident] > 0, 12.0, -12.0).double()  # masked at delta < 1
        leaves = {"z": z}
        target = labels
    elif entry.kind == "linear":
        x = torch.randn(M, D, generator=g, dtype=torch.float64)
        w = torch.randn(C, D, generator=g, dtype=torch.float64)
        x[confident] = 4.0 * w[target[confident]]
        x[1] = 12.0 * w[target[1]]  # so confident that its float32 cross entropy rounds to 0
        leaves = {"x": x, "w": w, "b": torch.randn(C, generator=g, dtype=torch.float64)}
    else:  # head, margin: hidden states through a module's own parameters
        if entry.kind == "head":
            module = entry.config["build"]()
        else:
            module = classifier_head(D, C, loss=entry.config["loss"])
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        module = module.to(dtype)
        if entry.config.get("eval"):
            module.eval()
        x = torch.randn(M, D, generator=g, dtype=torch.float64) * 2.0
        leaves = {"x": x}
    leaves = {k: v.to(dtype) for k, v in leaves.items()}
    if entry.kind != "multilabel" and ignored:
        target[[2, 7]] = ignore_index
    case = Case(leaves, target, delta, ignore_index, reduction, module, logits_layout, target_layout)
    if entry.kind != "multilabel":
        case.target = _clear_of_the_margin(entry, case, dtype)
        if entry.kind == "tokens":
            case.leaves["z"] = case.leaves["z"].reshape(N, SEQ, C).transpose(1, 2).contiguous()
            case.target = case.target.reshape(N, SEQ)
        case.target = _target_layout(case.target, target_layout)
    for leaf in case.leaves.values():
        leaf.requires_grad_()
    return case


# ------------------------------------------------------------------------------------ reductions
def _reduce(rows: Tensor, valid: Tensor, reduction: str, shape, weights: Tensor | None = None) -> Tensor:
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    denominator = valid.sum() if weights is None else weights[valid].sum()
    return total / denominator.clamp(min=1) if weights is None else total / denominator


def _rows(z: Tensor) -> Tensor:
    return z.movedim(1, -1).reshape(-1, z.shape[1]) if z.dim() > 2 else z


def ref_as_softmax(z: Tensor, case: Case, delta: float | None = None) -> Out:
    delta = case.delta if delta is None else delta
    t = case.target
    loss = reference_as_softmax(z, t, delta, case.ignore_index, case.reduction)
    flat = t.reshape(-1)
    masked = reference_single_label_masked(_rows(z), flat, delta, case.ignore_index).sum()
    return Out(loss, masked)


def ref_logits(case: Case) -> Out:
    return ref_as_softmax(case.leaves["z"], case)


def _ce_rows(z: Tensor, t: Tensor, ignore_index: int, **kwargs) -> Tensor:
    return F.cross_entropy(_rows(z), t.reshape(-1), ignore_index=ignore_index, reduction="none", **kwargs)


def ref_family(name: str, kwargs: dict) -> Callable[[Case], Out]:
    """The float64 reference of ``build_loss(name, **kwargs)`` on logits."""

    def reference(case: Case) -> Out:
        z, t, ii = case.leaves["z"], case.target.reshape(-1), case.ignore_index
        valid = t != ii
        safe = torch.where(valid, t, 0)
        if name == "as_softmax":
            return ref_as_softmax(z, case, case.delta)
        if name == "softmax":
            rows = _ce_rows(z, t, ii)
        elif name == "t_softmax":
            rows = _ce_rows(z / kwargs["temperature"], t, ii)
        elif name == "label_smoothing":
            logp = torch.log_softmax(z, 1)
            eps = kwargs["smoothing"]
            rows = -(1 - eps) * logp.gather(1, safe[:, None]).squeeze(1) - eps * logp.mean(1)
            rows = torch.where(valid, rows, 0.0)
        elif name == "sparse_softmax":
            top = z.topk(kwargs["k"], dim=1).values
            rows = torch.where(valid, torch.logsumexp(top, 1) - z.gather(1, safe[:, None]).squeeze(1), 0.0)
        elif name in ("sparsemax", "entmax15"):
            import entmax

            fn = entmax.sparsemax_loss if name == "sparsemax" else entmax.entmax15_loss
            rows = torch.where(valid, fn(z, safe), 0.0)
        elif name == "weighted_softmax":
            weight = torch.tensor(kwargs["weight"], dtype=z.dtype)
            rows = _ce_rows(z, t, ii, weight=weight)
            wt = torch.where(valid, weight[safe], 0.0)
            return Out(_reduce(rows, valid, case.reduction, t.shape, wt), torch.zeros((), dtype=torch.long))
        else:
            raise AssertionError(name)
        # Dense losses never zero a sample out; the sparse ones are not compared here.
        return Out(_reduce(rows, valid, case.reduction, t.shape), torch.zeros((), dtype=torch.long))

    return reference


def ref_multilabel(case: Case) -> Out:
    z, y = case.leaves["z"], case.target
    rows = reference_multilabel(z, y, case.delta)
    valid = torch.ones(len(rows), dtype=torch.bool)
    masked = reference_multilabel_masked(z, y, case.delta).sum()
    return Out(_reduce(rows, valid, case.reduction, rows.shape), masked)


def ref_linear(case: Case) -> Out:
    lv = case.leaves
    return ref_as_softmax(F.linear(lv["x"], lv["w"], lv["b"]), case)


def _adaptive_reference(head) -> nn.Module:
    ref = nn.AdaptiveLogSoftmaxWithLoss(D, C, list(head.cutoffs[:-1]), div_value=head.div_value,
                                        head_bias=head.head_bias).double()
    ref.load_state_dict(head.state_dict())
    return ref


def ref_head(case: Case) -> Out:
    head, x = case.module, case.leaves["x"]
    name = type(head).__name__
    if name == "DenseHead":
        log_p = torch.log_softmax(head.linear(x), 1)  # the layer's own float64 product
    elif name == "AdaptiveSoftmaxHead":
        # torch's AdaptiveLogSoftmaxWithLoss.log_prob run on the head's own (float64) parameters,
        # so that the reference's gradients reach them.
        params = {f"inner.{k}": v for k, v in head.named_parameters()}
        log_p = torch.func.functional_call(_LogProb(_adaptive_reference(head)), params, (x,))
    else:  # class-based, hierarchical, sampled (eval): their exact distribution in float64
        log_p = head.log_prob(x)
    return ref_as_softmax(log_p, case)


class _LogProb(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner.log_prob(x)


def _margin_weights(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    if hasattr(module, "linear"):
        return module.linear.weight, module.linear.bias
    return module.weight, getattr(module, "bias", None)


def ref_margin(case: Case, entry_config: dict) -> Out:
    name, kwargs = entry_config["loss"], entry_config["kwargs"]
    x, t, ii = case.leaves["x"], case.target.reshape(-1), case.ignore_index
    valid = t != ii
    w, b = _margin_weights(case.module)
    logits = torch.zeros(len(t), C, dtype=x.dtype)
    logits = logits.index_put((valid.nonzero().squeeze(1),),
                              reference_margin_logits(name, x[valid], w, b, t[valid], **kwargs))
    return ref_as_softmax(logits, case)


# ------------------------------------------------------------------------------------ entries
def _functional(case: Case) -> Out:
    z = _logits_view(case.leaves["z"], case.logits_layout)
    return Out(as_softmax_cross_entropy(z, case.target, case.delta, ignore_index=case.ignore_index,
                                        reduction=case.reduction))


def _functional_stats(case: Case) -> Out:
    z = _logits_view(case.leaves["z"], case.logits_layout)
    loss, masked, _ = as_softmax_loss_and_stats(z, case.target, case.delta, ignore_index=case.ignore_index,
                                                reduction=case.reduction)
    return Out(loss, masked)


def _module(case: Case) -> Out:
    z = _logits_view(case.leaves["z"], case.logits_layout)
    criterion = ASSoftmaxLoss(case.delta, ignore_index=case.ignore_index, reduction=case.reduction)
    loss, masked, _ = criterion.loss_and_stats(z, case.target)
    return Out(loss, masked)


def _family(name: str, kwargs: dict) -> Callable[[Case], Out]:
    def run(case: Case) -> Out:
        z = _logits_view(case.leaves["z"], case.logits_layout)
        own = {"delta": case.delta} if name == "as_softmax" else kwargs  # the case's delta
        criterion = build_loss(name, ignore_index=case.ignore_index, reduction=case.reduction, **own)
        loss, masked, _ = criterion.loss_and_stats(z, case.target)
        return Out(loss, masked)

    return run


class _MixinModel(ASSoftmaxMixin, L.LightningModule):
    pass


def _mixin(case: Case) -> Out:
    model = _MixinModel(delta=case.delta, ignore_index=case.ignore_index)
    z = _logits_view(case.leaves["z"], case.logits_layout)
    return Out(model.as_softmax_loss(z, case.target))


def _mixin_linear(case: Case) -> Out:
    model = _MixinModel(delta=case.delta, ignore_index=case.ignore_index)
    lv = case.leaves
    return Out(model.as_softmax_linear_loss(lv["x"], lv["w"], case.target, lv["b"]))


def _mixin_head(case: Case) -> Out:
    model = _MixinModel(delta=case.delta, ignore_index=case.ignore_index)
    return Out(model.as_softmax_head_loss(case.module, case.leaves["x"], case.target))


def _huggingface(case: Case) -> Out:
    from lightning_assoftmax.huggingface import ASSoftmaxLossFunc

    z = _logits_view(case.leaves["z"], case.logits_layout)
    if z.dim() > 2:
        z = z.transpose(1, 2)  # transformers' token logits are (N, L, C)
    loss_func = ASSoftmaxLossFunc(delta=case.delta, ignore_index=case.ignore_index)
    loss = loss_func({"logits": z}, case.target)
    masked, _ = loss_func.pop_counts()
    return Out(loss, masked)


def _multilabel(case: Case) -> Out:
    return Out(multilabel_as_softmax_loss(case.leaves["z"], case.target, case.delta, reduction=case.reduction))


def _multilabel_stats(case: Case) -> Out:
    loss, masked, _ = multilabel_as_softmax_loss_and_stats(case.leaves["z"], case.target, case.delta,
                                                           reduction=case.reduction)
    return Out(loss, masked)


def _multilabel_module(case: Case) -> Out:
    return Out(MultiLabelASSoftmaxLoss(case.delta, reduction=case.reduction)(case.leaves["z"], case.target))


def _linear(case: Case) -> Out:
    lv = case.leaves
    return Out(linear_as_softmax_cross_entropy(lv["x"], lv["w"], case.target, lv["b"], case.delta,
                                               ignore_index=case.ignore_index, reduction=case.reduction,
                                               chunk_size=5))


def _linear_stats(case: Case) -> Out:
    lv = case.leaves
    loss, masked, _ = linear_as_softmax_loss_and_stats(lv["x"], lv["w"], case.target, lv["b"], case.delta,
                                                       ignore_index=case.ignore_index, reduction=case.reduction)
    return Out(loss, masked)


def _linear_module(case: Case) -> Out:
    lv = case.leaves
    criterion = LinearASSoftmaxLoss(case.delta, ignore_index=case.ignore_index, reduction=case.reduction,
                                    chunk_size=4)
    loss, masked, _ = criterion.loss_and_stats(lv["x"], lv["w"], case.target, lv["b"])
    return Out(loss, masked)


def _head_stats(case: Case) -> Out:
    loss, masked, _ = case.module.loss_and_stats(case.leaves["x"], case.target, delta=case.delta,
                                                 ignore_index=case.ignore_index, reduction=case.reduction)
    return Out(loss, masked)


def _head_loss(case: Case) -> Out:
    return Out(case.module.loss(case.leaves["x"], case.target, delta=case.delta,
                                ignore_index=case.ignore_index, reduction=case.reduction))


def _margin(name: str, kwargs: dict) -> Callable[[Case], Out]:
    def run(case: Case) -> Out:
        criterion = build_loss(name, delta=case.delta, ignore_index=case.ignore_index,
                               reduction=case.reduction, **kwargs)
        loss, masked, _ = criterion.loss_and_stats(case.module(case.leaves["x"]), case.target)
        return Out(loss, masked)

    return run


FAMILY_KWARGS = {
    "as_softmax": {},  # the case's delta
    "softmax": {},
    "t_softmax": {"temperature": 2.0},
    "sparse_softmax": {"k": 3},
    "sparsemax": {},
    "entmax15": {},
    "label_smoothing": {"smoothing": 0.1},
    "weighted_softmax": {"weight": [0.5, 1.0, 2.0, 1.5, 0.7, 1.2, 0.9]},
}
HEAD_BUILDERS = {
    "dense": lambda: build_head("dense", D, C),
    "adaptive": lambda: build_head("adaptive", D, C, cutoffs=[3, 5], div_value=2.0),
    "class_based": lambda: build_head("class_based", D, C, cluster_of=[i % 3 for i in range(C)]),
    "hierarchical": lambda: build_head("hierarchical", D, C, class_counts=[9, 7, 5, 4, 3, 2, 1]),
    "sampled": lambda: build_head("sampled", D, C, num_samples=5, proposal="uniform"),
}

SINGLE = ("mean", "sum", "none")
ENTRIES: list[Entry] = [
    Entry("as_softmax_cross_entropy", "logits", _functional, ref_logits, masked=False, triton=True),
    Entry("as_softmax_loss_and_stats", "logits", _functional_stats, ref_logits, triton=True),
    Entry("ASSoftmaxLoss", "logits", _module, ref_logits, triton=True),
    Entry("as_softmax_cross_entropy[tokens]", "tokens", _functional, ref_logits, masked=False, triton=True),
    Entry("as_softmax_loss_and_stats[tokens]", "tokens", _functional_stats, ref_logits, triton=True),
    Entry("ASSoftmaxLoss[tokens]", "tokens", _module, ref_logits, triton=True),
    Entry("mixin.as_softmax_loss", "logits", _mixin, ref_logits, reductions=("mean",), masked=False, triton=True),
    Entry("mixin.as_softmax_loss[tokens]", "tokens", _mixin, ref_logits, reductions=("mean",), masked=False),
    Entry("ASSoftmaxLossFunc", "logits", _huggingface, ref_logits, reductions=("mean",), ignore_indices=(-100,),
          triton=True),
    Entry("ASSoftmaxLossFunc[tokens]", "tokens", _huggingface, ref_logits, reductions=("mean",),
          ignore_indices=(-100,)),
    Entry("multilabel_as_softmax_loss", "multilabel", _multilabel, ref_multilabel, ignore_indices=(-100,),
          masked=False),
    Entry("multilabel_as_softmax_loss_and_stats", "multilabel", _multilabel_stats, ref_multilabel,
          ignore_indices=(-100,)),
    Entry("MultiLabelASSoftmaxLoss", "multilabel", _multilabel_module, ref_multilabel, ignore_indices=(-100,),
          masked=False),
    Entry("linear_as_softmax_cross_entropy", "linear", _linear, ref_linear, masked=False, triton=True),
    Entry("linear_as_softmax_loss_and_stats", "linear", _linear_stats, ref_linear, triton=True),
    Entry("LinearASSoftmaxLoss", "linear", _linear_module, ref_linear, triton=True),
    Entry("mixin.as_softmax_linear_loss", "linear", _mixin_linear, ref_linear, reductions=("mean",),
          masked=False, triton=True),
    *[
        Entry(f"build_loss:{name}", "logits", _family(name, kw), ref_family(name, kw),
              masked=name not in ("sparse_softmax", "sparsemax", "entmax15"), triton=name in ("as_softmax", "softmax"))
        for name, kw in FAMILY_KWARGS.items()
        if HAS_ENTMAX or name not in ("sparsemax", "entmax15")
    ],
    *[
        Entry(f"build_loss:{name}", "margin", _margin(name, kw),
              (lambda config: lambda case: ref_margin(case, config))({"loss": name, "kwargs": kw}),
              config={"loss": name, "kwargs": kw})
        for name, kw in MARGIN_KWARGS.items()
    ],
    *[
        Entry(f"head:{name}.loss_and_stats", "head", _head_stats, ref_head, triton=name == "dense",
              config={"build": build, "eval": name == "sampled"})
        for name, build in HEAD_BUILDERS.items()
    ],
    Entry("head:dense.loss", "head", _head_loss, ref_head, masked=False, config={"build": HEAD_BUILDERS["dense"]}),
    Entry("mixin.as_softmax_head_loss", "head", _mixin_head, ref_head, reductions=("mean",), masked=False,
          triton=True, config={"build": HEAD_BUILDERS["dense"]}),
]
if not HAS_TRANSFORMERS:
    ENTRIES = [e for e in ENTRIES if not e.name.startswith("ASSoftmaxLossFunc")]


def _ids(entries):
    return [e.name for e in entries]


# ------------------------------------------------------------------------------------ comparison
def _upstream(loss: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5)


def check(entry: Entry, case: Case, dtype: torch.dtype, autocast: tuple[str, torch.dtype] | None = None,
          check_masked: bool = True) -> None:
    """Run ``entry`` on ``case`` and compare value, gradients and masked count with the float64
    reference on the same input values."""
    ref_case = case.as_float64()
    expected = entry.reference(ref_case)
    upstream = _upstream(expected.loss)
    (expected.loss * upstream).sum().backward()
    if autocast is None:
        got = entry.run(case)
    else:
        with torch.autocast(autocast[0], dtype=autocast[1]):
            got = entry.run(case)
    assert got.loss.shape == expected.loss.shape
    assert got.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), got.loss.dtype
    (got.loss * upstream.to(got.loss.device, got.loss.dtype)).sum().backward()
    rtol, atol = TOL[dtype if autocast is None else autocast[1]]
    torch.testing.assert_close(got.loss.detach().double().cpu(), expected.loss.detach(), rtol=rtol, atol=atol)
    for mine, theirs in zip(case.params(), ref_case.params(), strict=True):
        assert mine.grad is not None and mine.grad.dtype == mine.dtype
        scale = max(1.0, float(theirs.grad.abs().max()))
        torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, rtol=rtol, atol=atol * scale)
    if check_masked and entry.masked:
        assert got.masked is not None
        assert int(got.masked) == int(expected.masked)


def _grid(entries, with_dtypes=DTYPES):
    """(entry, dtype, reduction, ignore_index): all reductions and ignore values in float32, a
    selection in the other dtypes."""
    out = []
    for e in entries:
        for dtype in with_dtypes:
            pairs = [(r, i) for r in e.reductions for i in e.ignore_indices]
            if dtype != torch.float32:
                pairs = pairs[:: max(1, len(pairs) // 2)][:2]
            for reduction, ignore_index in pairs:
                out.append(pytest.param(e, dtype, reduction, ignore_index,
                                        id=f"{e.name}-{str(dtype)[6:]}-{reduction}-{ignore_index}"))
    return out


# ------------------------------------------------------------------------------------ generic tests
def test_the_table_covers_every_public_entry_point():
    from lightning_assoftmax.family import LOSS_NAMES
    from lightning_assoftmax.heads import HEAD_NAMES

    names = {e.name for e in ENTRIES}
    built = {n.split(":")[1] for n in names if n.startswith("build_loss:")}
    missing = set(LOSS_NAMES) - built - ({"sparsemax", "entmax15"} if not HAS_ENTMAX else set())
    assert missing == set(), missing
    heads = {n.split(":")[1].split(".")[0] for n in names if n.startswith("head:")}
    assert heads | {"nce"} == set(HEAD_NAMES)  # nce: log_prob only (test_log_prob_is_exact)


@pytest.mark.parametrize("kind", ["logits", "tokens", "multilabel", "linear"])
def test_cases_hold_masked_partly_kept_and_ignored_rows(kind):
    """The builders are not vacuous: masked rows, rows with a loss, and ignored rows all occur."""
    entry = next(e for e in ENTRIES if e.kind == kind and e.masked)
    case = make_case(entry, torch.float32, reduction="none")
    expected = entry.reference(case.as_float64())
    assert 0 < int(expected.masked) < 8
    assert (expected.loss > 0).any()
    if kind != "multilabel":
        assert (case.target == -100).any()


@pytest.mark.parametrize("entry, dtype, reduction, ignore_index", _grid(ENTRIES))
def test_values_gradients_and_masked_counts(entry, dtype, reduction, ignore_index):
    case = make_case(entry, dtype, reduction=reduction, ignore_index=ignore_index)
    check(entry, case, dtype)


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_without_ignored_positions(entry):
    case = make_case(entry, torch.float32, reduction=entry.reductions[0], ignored=False)
    check(entry, case, torch.float32)


TARGET_ENTRIES = [e for e in ENTRIES if e.kind != "multilabel"]


@pytest.mark.parametrize("layout", ["strided", "expanded", "int32"])
@pytest.mark.parametrize("entry", TARGET_ENTRIES, ids=_ids(TARGET_ENTRIES))
def test_target_layouts(entry, layout):
    """A sliced column, a stride-0 expanded target and int32 indices read as the same classes."""
    case = make_case(entry, torch.float32, reduction=entry.reductions[-1], ignore_index=entry.ignore_indices[-1],
                     target_layout=layout)
    check(entry, case, torch.float32)


LOGITS_ENTRIES = [e for e in ENTRIES if e.kind in ("logits", "tokens")]


@pytest.mark.parametrize("entry", LOGITS_ENTRIES, ids=_ids(LOGITS_ENTRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_logits(entry, dtype):
    """Transposed (N, C) logits; (N, C, L) logits viewed from (N, L, C) memory."""
    layout = "transposed" if entry.kind == "logits" else "channel_last_view"
    case = make_case(entry, dtype, reduction=entry.reductions[-1], logits_layout=layout)
    check(entry, case, dtype)


AUTOCAST_ENTRIES = [e for e in ENTRIES if e.kind in ("linear", "head", "margin")] + [ENTRIES[1]]
AUTOCAST_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("entry", AUTOCAST_ENTRIES, ids=_ids(AUTOCAST_ENTRIES))
def test_under_autocast(entry, dtype, device):
    """float32 inputs under torch.autocast: products in the autocast dtype, the loss in float32,
    each gradient in its input's dtype (float32); values within the autocast dtype's tolerance."""
    if device == "cuda":
        pytest.skip("CUDA autocast runs in test_under_autocast_on_cuda")
    case = make_case(entry, dtype, reduction=entry.reductions[-1])  # decisions clear at this dtype
    case.leaves = {k: v.detach().float().requires_grad_() for k, v in case.leaves.items()}
    if case.module is not None:
        case.module = case.module.float()
    check(entry, case, torch.float32, autocast=("cpu", dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("entry", AUTOCAST_ENTRIES, ids=_ids(AUTOCAST_ENTRIES))
def test_under_autocast_on_cuda(entry, dtype):
    case = make_case(entry, dtype, reduction=entry.reductions[-1])
    case.leaves = {k: v.detach().float().cuda().requires_grad_() for k, v in case.leaves.items()}
    case.target = case.target.cuda()
    if case.module is not None:
        case.module = case.module.float().cuda()
    ref_case = copy.copy(case)
    ref_case.leaves = {k: v.detach().cpu() for k, v in case.leaves.items()}
    expected = entry.reference(Case(
        {k: v.double().requires_grad_() for k, v in ref_case.leaves.items()}, case.target.cpu().long(),
        case.delta, case.ignore_index, case.reduction,
        None if case.module is None else copy.deepcopy(case.module).cpu().double(),
    ))
    with torch.autocast("cuda", dtype=dtype):
        got = entry.run(case)
    assert got.loss.dtype == torch.float32
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.loss.detach().double().cpu(), expected.loss.detach(), rtol=rtol, atol=atol)
    got.loss.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in case.params())


MASKED_ENTRIES = [e for e in ENTRIES if e.masked and e.name in (
    "as_softmax_loss_and_stats", "ASSoftmaxLoss", "as_softmax_loss_and_stats[tokens]", "ASSoftmaxLossFunc",
    "multilabel_as_softmax_loss_and_stats", "linear_as_softmax_loss_and_stats", "build_loss:as_softmax",
    "build_loss:arcface", "head:dense.loss_and_stats", "head:adaptive.loss_and_stats",
    "head:hierarchical.loss_and_stats",
)]


@pytest.mark.parametrize("delta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("entry", MASKED_ENTRIES, ids=_ids(MASKED_ENTRIES))
def test_masked_flags_follow_the_papers_definition(entry, delta):
    """Masked = only the target kept (never the loss value): at delta = 1 no sample is masked,
    not even one whose float32 cross entropy rounds to 0."""
    case = make_case(entry, torch.float32, reduction="sum", delta=delta)
    expected = entry.reference(case.as_float64())
    got = entry.run(case)
    assert int(got.masked) == int(expected.masked)
    if delta == 1.0:
        assert int(got.masked) == 0


# ------------------------------------------------------------------------------ mask and ratio
MASK_ENTRY = ENTRIES[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "tokens"])
@pytest.mark.parametrize("target_layout", ["contiguous", "strided", "int32"])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_keep_mask_and_masked_sample_ratio(dtype, layout, target_layout, ignore_index):
    entry = ENTRIES[3] if layout == "tokens" else MASK_ENTRY
    case = make_case(entry, dtype, ignore_index=ignore_index, target_layout=target_layout,
                     logits_layout="channel_last_view" if layout == "tokens" else layout)
    z = _logits_view(case.leaves["z"], case.logits_layout).detach()
    flat = case.plain_target().reshape(-1)
    rows64 = _rows(case.leaves["z"].detach().double())
    valid = flat != ignore_index
    want = reference_keep_mask(rows64, flat.clamp(min=0), DELTA) & valid[:, None]
    got = as_softmax_keep_mask(z, case.target, DELTA, ignore_index=ignore_index)
    assert got.shape == z.shape and got.dtype == torch.bool
    assert torch.equal(_rows(got), want)
    ratio = masked_sample_ratio(z, case.target, DELTA, ignore_index=ignore_index)
    masked = reference_single_label_masked(rows64, flat, DELTA, ignore_index)
    assert ratio.item() == pytest.approx(masked.sum().item() / max(valid.sum().item(), 1))


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_masked_sample_ratio_at_the_ends_of_delta(delta):
    case = make_case(MASK_ENTRY, torch.float32, delta=delta)
    flat = case.plain_target()
    masked = reference_single_label_masked(case.leaves["z"].detach(), flat, delta)
    ratio = masked_sample_ratio(case.leaves["z"].detach(), case.target, delta)
    assert ratio.item() == pytest.approx(masked.sum().item() / (flat != -100).sum().item())


# ------------------------------------------------------------------------------ heads' log_prob
LOG_PROB_HEADS = {**HEAD_BUILDERS, "nce": lambda: build_head("nce", D, C, num_samples=5)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOG_PROB_HEADS))
def test_log_prob_is_exact(name, dtype):
    """Each head's log_prob against an independent float64 distribution: log_softmax of the
    linear layer (dense, sampled, nce), torch's AdaptiveLogSoftmaxWithLoss (adaptive); the tree
    heads against their own float64 evaluation, rows summing to one."""
    g = torch.Generator().manual_seed(5)
    head = LOG_PROB_HEADS[name]()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x64 = torch.randn(M, D, generator=g, dtype=torch.float64)
    head64 = copy.deepcopy(head).double()
    if name in ("dense", "sampled", "nce"):
        weight, bias = (head64.linear.weight, head64.linear.bias) if name == "dense" else (head64.weight, head64.bias)
        want = torch.log_softmax(F.linear(x64, weight, bias), 1)
    elif name == "adaptive":
        want = _adaptive_reference(head64).log_prob(x64)
    else:
        want = head64.log_prob(x64)
    torch.testing.assert_close(want.exp().sum(1), torch.ones(M, dtype=torch.float64))
    x = x64.to(dtype)
    got = head.to(dtype).log_prob(x)
    assert got.shape == (M, C)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol * 3, atol=atol * 10)


# ------------------------------------------------------------------------------ Triton kernel
TRITON_ENTRIES = [e for e in ENTRIES if e.triton]


@pytest.fixture
def on_triton(monkeypatch):
    """Every rows op call on the Triton kernel (interpreted on CPU tensors without a GPU), as
    tests/test_triton_kernel.py forces it."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set before triton was imported)")
    import importlib

    kernel = importlib.import_module("lightning_assoftmax.ops.triton_single_label")
    from lightning_assoftmax.ops import linear_single_label, single_label

    def pick(logits):
        if logits.dtype in kernel.SUPPORTED_DTYPES:
            return kernel.as_softmax_forward_rows_triton
        return single_label.as_softmax_forward_rows

    monkeypatch.setattr(single_label, "forward_rows_implementation", pick)
    monkeypatch.setattr(linear_single_label, "forward_rows_implementation", pick)


@pytest.mark.parametrize("target_layout", ["contiguous", "strided", "expanded", "int32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entry", TRITON_ENTRIES, ids=_ids(TRITON_ENTRIES))
def test_on_the_triton_kernel(on_triton, entry, dtype, target_layout):
    reduction = entry.reductions[-1]
    case = make_case(entry, dtype, reduction=reduction, ignore_index=entry.ignore_indices[-1],
                     target_layout=target_layout)
    check(entry, case, dtype)


# ------------------------------------------------------------------------------ peers' cases
# Liger-Kernel's cross entropy tests: (B, T, V) shapes, a scalar on the logits, bf16 / fp32,
# ignore_index, every reduction, against torch's cross entropy; here scaled down, with delta = 1.
LIGER_CE_SHAPES = [(2, 8, 33), (1, 5, 257), (3, 7, 50)]


@pytest.mark.parametrize("B, T, V", LIGER_CE_SHAPES)
@pytest.mark.parametrize("scalar, dtype, tol", [(1.0, torch.bfloat16, 5e-2), (10.0, torch.float32, 1e-5),
                                                 (1.0, torch.float32, 1e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2, 42])
def test_liger_cross_entropy_cases(B, T, V, scalar, dtype, tol, reduction, ignore_index):
    g = torch.Generator().manual_seed(B * T + V)
    logits = (torch.randn(B * T, V, generator=g) * scalar).to(dtype)
    target = torch.randint(0, V, (B * T,), generator=g)
    target[torch.randperm(B * T, generator=g)[: B * T // 3]] = ignore_index
    ours_leaf = logits.clone().requires_grad_()
    torch_leaf = logits.clone().requires_grad_()
    ours = as_softmax_cross_entropy(ours_leaf, target, 1.0, ignore_index=ignore_index, reduction=reduction)
    theirs = F.cross_entropy(torch_leaf.double(), target, ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(ours.double(), theirs, rtol=tol, atol=tol)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours_leaf.grad.double(), torch_leaf.grad.double(), rtol=tol, atol=tol)


# Liger-Kernel's fused linear cross entropy tests: (B, T, H, V), with and without bias, bf16 / fp32,
# ignore_index and reductions, against F.linear + F.cross_entropy (delta = 1).
@pytest.mark.parametrize("B, T, H, V", [(2, 8, 16, 33), (1, 11, 32, 100)])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction, ignore_index", [("mean", -100), ("sum", 7), ("none", -100)])
def test_liger_fused_linear_cross_entropy_cases(B, T, H, V, dtype, tol, bias, reduction, ignore_index):
    g = torch.Generator().manual_seed(H + V)
    x = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, : T // 2] = ignore_index
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    ours = linear_as_softmax_cross_entropy(leaves[0], leaves[1], target, leaves[2] if bias else None, 1.0,
                                           ignore_index=ignore_index, reduction=reduction, chunk_size=6)
    logits = F.linear(refs[0], refs[1], refs[2] if bias else None)
    theirs = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(ours.double(), theirs, rtol=tol, atol=tol)
    ours.sum().backward()
    theirs.sum().backward()
    for mine, ref in zip(leaves, refs, strict=True):
        assert mine.grad.dtype == dtype
        scale = float(ref.grad.abs().max())
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=tol, atol=tol * max(scale, 1.0))


# PyTorch's adaptive softmax test: log_prob, predict and the loss of AdaptiveLogSoftmaxWithLoss;
# the adaptive head with delta = 1 (AS-Softmax over its exact distribution) gives the same loss.
@pytest.mark.parametrize("cutoffs, div_value, head_bias", [([3, 5], 2.0, False), ([2, 4, 6], 1.5, True)])
def test_pytorch_adaptive_softmax_cases(cutoffs, div_value, head_bias):
    torch.manual_seed(3)
    reference = nn.AdaptiveLogSoftmaxWithLoss(D, C + 3, cutoffs, div_value=div_value, head_bias=head_bias).double()
    head = build_head("adaptive", D, C + 3, cutoffs=cutoffs, div_value=div_value, head_bias=head_bias).double()
    head.load_state_dict(reference.state_dict())
    x = torch.randn(20, D, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, C + 3, (20,))
    out = reference(x, target)
    torch.testing.assert_close(out.output, reference.log_prob(x).gather(1, target[:, None]).squeeze(1))
    ours = head.loss(x, target, delta=1.0)
    torch.testing.assert_close(ours, out.loss)
    torch.testing.assert_close(head.log_prob(x), reference.log_prob(x))
    assert torch.equal(head.predict(x), reference.predict(x))
    (got,) = torch.autograd.grad(ours, x)
    (want,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(got, want)


# pytorch-metric-learning's margin-loss tests: ArcFace and CosFace with the same weights;
# composed with AS-Softmax at delta = 1 they stay the plain margin losses.
@pytest.mark.skipif(not HAS_PML, reason="needs pytorch-metric-learning")
@pytest.mark.parametrize("name, pml_name, ours, theirs", [
    ("arcface", "ArcFaceLoss", {"scale": 64.0, "margin": 0.5}, {"scale": 64, "margin": math.degrees(0.5)}),
    ("cosface", "CosFaceLoss", {"scale": 64.0, "margin": 0.35}, {"scale": 64, "margin": 0.35}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytorch_metric_learning_margin_cases(name, pml_name, ours, theirs, dtype):
    from pytorch_metric_learning import losses as pml

    torch.manual_seed(4)
    head = classifier_head(D, C, loss=name).to(dtype)
    reference = getattr(pml, pml_name)(num_classes=C, embedding_size=D, **theirs).to(dtype)
    with torch.no_grad():
        reference.W.copy_(head.weight.T)
    x = torch.randn(16, D, dtype=dtype)
    target = torch.randint(0, C, (16,))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = build_loss(name, delta=1.0, **ours)(head(x1), target)
    want = reference(x2, target)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    got.backward()
    want.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(head.weight.grad, reference.W.grad.T, rtol=tol * 10, atol=tol * 10)
