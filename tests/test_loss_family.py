"""The softmax family behind ``build_loss``, and the mixin driven by each of its members.

Every loss is checked against an independent reference written here (``F.cross_entropy``, plain
Python arithmetic, the ``entmax`` package on the non-ignored rows), never against its own output.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import XYSteps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import (
    ASSoftmaxLoss,
    ASSoftmaxMixin,
    CosineClassifier,
    DeltaWarmup,
    build_loss,
    classifier_head,
)
from lightning_assoftmax.family import LOSS_NAMES, FamilyLoss

torch.set_num_threads(1)

HAS_ENTMAX = importlib.util.find_spec("entmax") is not None
if HAS_ENTMAX:
    import entmax
needs_entmax = pytest.mark.skipif(not HAS_ENTMAX, reason="needs the entmax package (extra 'baselines')")

IGNORE = -100
NUM_CLASSES = 6
# Keywords that make every member differ from plain softmax on 6 classes.
KWARGS = {
    "softmax": {},
    "t_softmax": {"temperature": 2.5},
    "sparse_softmax": {"k": 3},
    "sparsemax": {},
    "entmax15": {},
    "label_smoothing": {"smoothing": 0.2},
    "am_softmax": {"scale": 10.0, "margin": 0.3},
    "as_softmax": {"delta": 0.2},
}
MASKING = {"sparsemax", "entmax15", "as_softmax"}
# The members above as parameters, the entmax-backed ones skipped where the optional package is
# missing; the large-margin members (their own heads) are tested in test_large_margin.py.
NAMES = [
    pytest.param(name, marks=needs_entmax) if name in ("sparsemax", "entmax15") else name
    for name in KWARGS
]


def make_batch(n: int = 12, num_classes: int = NUM_CLASSES, name: str = "softmax", seed: int = 0):
    """Logits (cosines for am_softmax), a target with two ignored rows, in float64."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=gen, dtype=torch.float64) * 2.0
    if name == "am_softmax":
        logits = torch.tanh(logits)
    target = torch.randint(0, num_classes, (n,), generator=gen)
    target[1] = IGNORE
    target[n - 2] = IGNORE
    return logits, target


# -- independent references (plain math on the non-ignored rows) ----------------------------------
def ref_sparse_softmax_rows(z: torch.Tensor, t: torch.Tensor, k: int) -> list[float]:
    out = []
    for row, target in zip(z.tolist(), t.tolist(), strict=True):
        top = sorted(row, reverse=True)[:k]
        out.append(math.log(sum(math.exp(v) for v in top)) - row[target])
    return out


def ref_am_softmax_rows(c: torch.Tensor, t: torch.Tensor, scale: float, margin: float) -> list[float]:
    out = []
    for row, target in zip(c.tolist(), t.tolist(), strict=True):
        adjusted = [scale * (v - margin) if i == target else scale * v for i, v in enumerate(row)]
        out.append(math.log(sum(math.exp(v) for v in adjusted)) - adjusted[target])
    return out


def ref_as_softmax_rows(z: torch.Tensor, t: torch.Tensor, delta: float) -> torch.Tensor:
    p = torch.softmax(z, dim=1).detach()
    p_t = p.gather(1, t[:, None])
    keep = (p_t - p) <= delta
    masked_logits = z.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(masked_logits, dim=1) - z.gather(1, t[:, None]).squeeze(1)


def ref_label_smoothing_rows(z: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    logp = torch.log_softmax(z, dim=1)
    return -(1 - eps) * logp.gather(1, t[:, None]).squeeze(1) - eps * logp.mean(dim=1)


def reference_rows(name: str, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row loss of the non-ignored rows ``z (M, C)``, ``t (M,)``, differentiable in ``z``."""
    kw = KWARGS[name]
    if name == "softmax":
        return F.cross_entropy(z, t, reduction="none")
    if name == "t_softmax":
        return F.cross_entropy(z / kw["temperature"], t, reduction="none")
    if name == "label_smoothing":
        return F.cross_entropy(z, t, label_smoothing=kw["smoothing"], reduction="none")
    if name == "sparsemax":
        return entmax.sparsemax_loss(z, t)
    if name == "entmax15":
        return entmax.entmax15_loss(z, t)
    if name == "as_softmax":
        return ref_as_softmax_rows(z, t, kw["delta"])
    if name == "sparse_softmax":
        # differentiable form for gradients; values are checked against plain math separately
        top = z.topk(kw["k"], dim=1).values
        return torch.logsumexp(top, dim=1) - z.gather(1, t[:, None]).squeeze(1)
    if name == "am_softmax":
        margins = F.one_hot(t, z.shape[1]).to(z.dtype) * kw["margin"]
        return F.cross_entropy(kw["scale"] * (z - margins), t, reduction="none")
    raise AssertionError(name)


# -- build_loss -------------------------------------------------------------------------------------
@needs_entmax
def test_every_documented_name_is_built():
    assert LOSS_NAMES == (
        "softmax",
        "t_softmax",
        "sparse_softmax",
        "sparsemax",
        "entmax15",
        "label_smoothing",
        "am_softmax",
        "as_softmax",
        "l_softmax",
        "sphereface",
        "l2_softmax",
        "normface",
        "cosface",
        "arcface",
        "weighted_softmax",
    )
    for name in LOSS_NAMES:
        module = build_loss(name, **KWARGS.get(name, {}))
        assert isinstance(module, nn.Module)
        assert module.name == name
        assert module.ignore_index == IGNORE and module.reduction == "mean"
    assert isinstance(build_loss("as_softmax"), ASSoftmaxLoss)
    assert all(isinstance(build_loss(n), FamilyLoss) for n in LOSS_NAMES if n != "as_softmax")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown loss 'cross_entropy'") as err:
        build_loss("cross_entropy")
    for name in LOSS_NAMES:
        assert name in str(err.value)
    with pytest.raises(TypeError, match="must be a string"):
        build_loss(None)  # type: ignore[arg-type]


@needs_entmax
def test_unexpected_kwargs_name_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) delta, k; 'sparsemax' accepts: ignore_index, reduction"):
        build_loss("sparsemax", k=3, delta=0.1)
    with pytest.raises(TypeError, match="'am_softmax' accepts: scale, margin, delta, ignore_index, reduction"):
        build_loss("am_softmax", s=30)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("t_softmax", {"temperature": 0.0}, r"temperature must lie in \(0, inf\)"),
        ("t_softmax", {"temperature": float("nan")}, "temperature"),
        ("sparse_softmax", {"k": 0}, "k must be a positive integer, got 0"),
        ("sparse_softmax", {"k": 2.5}, "k must be a positive int"),
        ("label_smoothing", {"smoothing": 1.0}, r"smoothing must lie in \[0, 1\)"),
        ("am_softmax", {"scale": -1.0}, "scale must lie in"),
        ("am_softmax", {"margin": -0.1}, "margin must lie in"),
        ("softmax", {"reduction": "avg"}, "reduction must be one of"),
        ("softmax", {"ignore_index": 1.5}, "ignore_index must be an int"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_loss(name, **kwargs)


# -- values and gradients against the references -----------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_on_non_ignored_rows(name):
    logits, target = make_batch(name=name)
    valid = target != IGNORE
    criterion = build_loss(name, **KWARGS[name], reduction="none")

    z = logits.clone().requires_grad_(True)
    per_element = criterion(z, target)
    z_ref = logits[valid].clone().requires_grad_(True)
    expected = reference_rows(name, z_ref, target[valid])

    assert per_element.shape == target.shape
    assert per_element.dtype == torch.float64
    torch.testing.assert_close(per_element[valid], expected.detach())
    assert torch.equal(per_element[~valid], torch.zeros(2, dtype=torch.float64))

    weights = torch.linspace(0.5, 2.0, int(valid.sum()), dtype=torch.float64)
    (per_element[valid] * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(z.grad[valid], z_ref.grad)


def test_dense_members_equal_cross_entropy_with_its_own_options():
    logits, target = make_batch()
    for name, reference in (
        ("softmax", F.cross_entropy(logits, target)),
        ("t_softmax", F.cross_entropy(logits / 2.5, target)),
        ("label_smoothing", F.cross_entropy(logits, target, label_smoothing=0.2)),
        ("as_softmax", F.cross_entropy(logits, target)),
    ):
        kwargs = {"delta": 1.0} if name == "as_softmax" else KWARGS[name]
        torch.testing.assert_close(build_loss(name, **kwargs)(logits, target), reference)
    valid = target != IGNORE
    torch.testing.assert_close(
        build_loss("label_smoothing", smoothing=0.2, reduction="none")(logits, target)[valid],
        ref_label_smoothing_rows(logits[valid], target[valid], 0.2),
    )


def test_sparse_softmax_matches_plain_arithmetic():
    logits, target = make_batch(n=40, num_classes=9, seed=3)
    valid = target != IGNORE
    for k in (1, 2, 5, 9, 20):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = build_loss("sparse_softmax", k=k, reduction="none")(logits, target)[valid]
        expected = ref_sparse_softmax_rows(logits[valid], target[valid], k)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(got, F.cross_entropy(logits[valid], target[valid], reduction="none"))


def test_sparse_softmax_hand_computed_target_outside_top_k():
    # top-2 of [2, 1, 0, -1] is {0, 1}; the target 2 is not in it and is not added to it (paper).
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    loss = build_loss("sparse_softmax", k=2)(z, torch.tensor([2]))
    assert loss.item() == pytest.approx(math.log(math.exp(2.0) + math.exp(1.0)) - 0.0, abs=1e-12)
    loss.backward()
    p0 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.0))
    torch.testing.assert_close(z.grad, torch.tensor([[p0, 1.0 - p0, -1.0, 0.0]], dtype=torch.float64))

    # target inside the top-2: cross entropy over the two largest logits only.
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    loss = build_loss("sparse_softmax", k=2)(z, torch.tensor([1]))
    assert loss.item() == pytest.approx(math.log(math.exp(2.0) + math.exp(1.0)) - 1.0, abs=1e-12)


def test_sparse_softmax_warns_when_k_covers_every_class():
    z, t = make_batch(num_classes=4)
    with pytest.warns(UserWarning, match="k=10 keeps all 4 classes"):
        build_loss("sparse_softmax")(z, t)


def test_am_softmax_hand_computed():
    cosines = torch.tensor([[0.8, 0.3, -0.1], [0.2, 0.5, 0.4]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2])
    loss = build_loss("am_softmax", reduction="none")(cosines, target)  # s=30, m=0.35
    # row 0: 30 * [0.45, 0.3, -0.1] = [13.5, 9, -3], target 13.5
    row0 = math.log(math.exp(13.5) + math.exp(9.0) + math.exp(-3.0)) - 13.5
    # row 1: 30 * [0.2, 0.5, 0.05] = [6, 15, 1.5], target 1.5
    row1 = math.log(math.exp(6.0) + math.exp(15.0) + math.exp(1.5)) - 1.5
    torch.testing.assert_close(loss, torch.tensor([row0, row1], dtype=torch.float64))
    expected = ref_am_softmax_rows(cosines.detach(), target, 30.0, 0.35)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    loss[1].backward()
    e = [math.exp(6.0), math.exp(15.0), math.exp(1.5)]
    grad_row1 = [30.0 * v / sum(e) for v in e]
    grad_row1[2] -= 30.0
    torch.testing.assert_close(cosines.grad[1], torch.tensor(grad_row1, dtype=torch.float64))
    assert torch.equal(cosines.grad[0], torch.zeros(3, dtype=torch.float64))


def test_am_softmax_refuses_raw_logits_and_points_to_the_cosine_head():
    with pytest.raises(ValueError, match=r"cosine logits in \[-1, 1\].*CosineClassifier"):
        build_loss("am_softmax")(torch.tensor([[3.0, -1.0]]), torch.tensor([0]))
    # an ignored row is not looked at
    loss = build_loss("am_softmax")(torch.tensor([[0.5, -1.0], [7.0, 0.0]]), torch.tensor([0, IGNORE]))
    assert torch.isfinite(loss)


# -- ignore_index, reductions, layouts, dtypes ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_ignored_rows_get_exactly_zero_gradient_even_when_they_hold_nan(name):
    logits, target = make_batch(name=name)
    logits[1] = float("nan")  # an ignored row
    logits[-2] = 1e4 if name != "am_softmax" else 1.0
    z = logits.clone().requires_grad_(True)
    loss = build_loss(name, **KWARGS[name])(z, target)
    assert torch.isfinite(loss)
    loss.backward()
    ignored = target == IGNORE
    assert torch.equal(z.grad[ignored], torch.zeros_like(z.grad[ignored]))
    assert z.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_reductions(name):
    logits, target = make_batch(name=name)
    valid = target != IGNORE
    none = build_loss(name, **KWARGS[name], reduction="none")(logits, target)
    total = build_loss(name, **KWARGS[name], reduction="sum")(logits, target)
    mean = build_loss(name, **KWARGS[name], reduction="mean")(logits, target)
    assert none.shape == target.shape and total.dim() == 0 and mean.dim() == 0
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none[valid].sum() / valid.sum())


@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_batch_gives_zero_not_nan_and_backward_works(name):
    logits, _ = make_batch(name=name)
    target = torch.full((logits.shape[0],), IGNORE)
    for reduction in ("mean", "sum"):
        z = logits.clone().requires_grad_(True)
        loss = build_loss(name, **KWARGS[name], reduction=reduction)(z, target)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(z.grad, torch.zeros_like(z))
    none = build_loss(name, **KWARGS[name], reduction="none")(logits, target)
    assert torch.equal(none, torch.zeros(logits.shape[0], dtype=logits.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_token_layout_equals_flattened_rows(name):
    # (N, C, L) with the class dimension second, as F.cross_entropy takes token logits.
    logits, target = make_batch(n=15, name=name, seed=5)
    tokens = logits.reshape(3, 5, NUM_CLASSES).transpose(1, 2)  # (3, C, 5)
    token_target = target.reshape(3, 5)
    criterion = build_loss(name, **KWARGS[name], reduction="none")
    got = criterion(tokens, token_target)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.reshape(-1), criterion(logits, target))


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_logits_are_computed_in_float32(name):
    logits, target = make_batch(name=name)
    half = logits.to(torch.bfloat16)
    loss = build_loss(name, **KWARGS[name])(half, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, build_loss(name, **KWARGS[name])(half.float(), target))


@needs_entmax
def test_target_out_of_range_is_refused():
    with pytest.raises(ValueError, match="class index 6"):
        build_loss("sparsemax")(torch.zeros(2, 6), torch.tensor([0, 6]))


# -- masked (exactly-zero-loss) samples ---------------------------------------------------------
def masked_count(name: str, logits: torch.Tensor, target: torch.Tensor, **kwargs) -> int:
    _, masked, valid = build_loss(name, **kwargs).loss_and_stats(logits, target)
    assert masked.dtype == torch.long and valid.item() == int((target != IGNORE).sum())
    return int(masked)


@needs_entmax
def test_sparse_losses_count_samples_past_their_margin():
    # sparsemax zeroes a sample once the target leads by 1, 1.5-entmax by 2 (p* = one-hot).
    logits = torch.tensor(
        [[3.0, 2.0, 0.0], [3.0, 2.5, 0.0], [0.0, 5.0, 2.9], [0.0, 0.0, 9.0], [0.0, 9.0, 0.0]]
    )
    target = torch.tensor([0, 0, 1, 2, IGNORE])
    assert masked_count("sparsemax", logits, target) == 3  # rows 0, 2, 3
    assert masked_count("entmax15", logits, target) == 2  # rows 2, 3
    losses = build_loss("sparsemax", reduction="none")(logits, target)
    assert (losses[[0, 2, 3]] == 0).all() and losses[1] > 0
    # sparse_softmax with k=1 is max(z) - z_t: zero exactly when the target is the argmax
    assert masked_count("sparse_softmax", logits, target, k=1) == 4
    assert build_loss("sparse_softmax", k=1).produces_masked_samples
    assert not build_loss("sparse_softmax", k=2).produces_masked_samples


@needs_entmax
def test_masked_samples_have_exactly_zero_gradient():
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 5.0, 2.9], [1.0, 0.5, 0.0]], requires_grad=True)
    target = torch.tensor([0, 1, 0])
    for name in ("sparsemax", "entmax15"):
        logits.grad = None
        build_loss(name, reduction="sum")(logits, target).backward()
        assert torch.equal(logits.grad[1], torch.zeros(3))
        assert logits.grad[2].abs().sum() > 0


def test_dense_losses_report_no_masked_samples_even_when_float32_rounds_to_zero():
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    target = torch.tensor([0, 0])
    assert F.cross_entropy(logits, target, reduction="none")[0].item() == 0.0
    for name in ("softmax", "t_softmax", "label_smoothing", "sparse_softmax"):
        assert masked_count(name, logits, target, **({"k": 2} if name == "sparse_softmax" else {})) == 0
    assert masked_count("am_softmax", torch.tensor([[1.0, -1.0, -1.0]]), torch.tensor([0])) == 0
    assert masked_count("as_softmax", logits, target) == 1


def test_predictive_logits():
    z = torch.tensor([[0.5, -0.25]])
    assert torch.equal(build_loss("softmax").predictive_logits(z), z)
    assert torch.equal(build_loss("t_softmax", temperature=2.0).predictive_logits(z), z / 2.0)
    assert torch.equal(build_loss("am_softmax", scale=30.0).predictive_logits(z), 30.0 * z)
    assert torch.equal(build_loss("as_softmax").predictive_logits(z), z)


# -- heads ------------------------------------------------------------------------------------------
def test_classifier_head_switches_to_cosines_for_am_softmax():
    head = classifier_head(8, 5, loss="am_softmax")
    assert isinstance(head, CosineClassifier)
    out = head(torch.randn(16, 8) * 50)
    assert out.shape == (16, 5) and out.abs().max() <= 1 + 1e-6
    # the output is the cosine between the features and each class weight
    x = torch.randn(3, 8)
    expected = torch.stack(
        [torch.stack([F.cosine_similarity(row, w, dim=0) for w in head.weight]) for row in x]
    )
    torch.testing.assert_close(head(x), expected)
    for name in KWARGS:
        if name != "am_softmax":
            linear = classifier_head(8, 5, loss=name)
            assert type(linear) is nn.Linear and linear.out_features == 5
    with pytest.raises(ValueError, match="Known losses"):
        classifier_head(8, 5, loss="arc_face")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        CosineClassifier(8, 0)


# -- the mixin in a real Trainer --------------------------------------------------------------------
class TinyClassifier(XYSteps, ASSoftmaxMixin, L.LightningModule):
    def __init__(self, loss: str = "as_softmax", loss_kwargs: dict | None = None, delta: float = 0.1):
        super().__init__(delta=delta, loss=loss, loss_kwargs=loss_kwargs)
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.head = classifier_head(16, 4, loss=loss)

    def forward(self, x):
        return self.head(self.body(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def tiny_loaders():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 5, generator=gen) * 3
    y = torch.randint(0, 4, (96,), generator=gen)
    x = centers[y] + torch.randn(96, 5, generator=gen)
    y[::7] = IGNORE
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=48)


def tiny_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


MIXIN_KWARGS = {**KWARGS, "sparse_softmax": {"k": 2}, "as_softmax": {}}


@pytest.mark.parametrize("name", NAMES)
def test_mixin_trains_with_each_loss_and_logs_the_documented_keys(name):
    train, val = tiny_loaders()
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(loss=name, loss_kwargs=MIXIN_KWARGS[name])
    trainer = tiny_trainer()
    trainer.fit(model, train, val)
    fit_metrics = dict(trainer.callback_metrics)
    assert fit_metrics["val/acc"] >= 0.9  # four separated clusters: every loss learns them
    trainer.test(model, val, verbose=False)
    logged = {**fit_metrics, **trainer.callback_metrics}
    # callback_metrics holds on_step+on_epoch values under the plain key and the _step/_epoch ones
    expected = {"train/loss", "train/loss_step", "train/loss_epoch", "val/loss", "val/ce_loss", "val/acc"}
    expected |= {"test/loss", "test/ce_loss", "test/acc"}
    ratios = {"val/masked_ratio", "test/masked_ratio"}
    ratios |= {"train/masked_ratio", "train/masked_ratio_step", "train/masked_ratio_epoch"}
    assert set(logged) == (expected | ratios if name in MASKING else expected)
    for key in expected:
        assert torch.isfinite(logged[key])

    # the logged values are the loss, plain CE of the predictive logits and accuracy over the data
    x, y = val.dataset.tensors
    valid = y != IGNORE
    with torch.no_grad():
        logits = model(x)
        expected_loss = build_loss(name, **MIXIN_KWARGS[name])(logits, y)
        scores = model.as_softmax_criterion.predictive_logits(logits[valid])
        expected_ce = F.cross_entropy(scores, y[valid])
        expected_acc = (logits[valid].argmax(1) == y[valid]).float().mean()
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["test/loss"], expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["test/ce_loss"], expected_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["test/acc"], expected_acc)

    # the counts AdaptiveGradAccumulation reads
    masked, count = model.as_softmax_last_stats
    assert count.item() == 16 - sum(1 for i in range(80, 96) if i % 7 == 0)
    if name not in MASKING:
        assert masked.item() == 0


@needs_entmax
def test_mixin_masked_ratio_is_the_share_of_exactly_zero_losses():
    train, val = tiny_loaders()
    model = TinyClassifier(loss="sparsemax")
    trainer = tiny_trainer(max_epochs=4)
    trainer.fit(model, train, val)
    trainer.test(model, val, verbose=False)
    x, y = val.dataset.tensors
    with torch.no_grad():
        losses = entmax.sparsemax_loss(model(x)[y != IGNORE], y[y != IGNORE])
    share = (losses == 0).float().mean()
    assert share > 0  # the tiny task is easy enough for sparsemax to zero samples out
    torch.testing.assert_close(trainer.callback_metrics["test/masked_ratio"], share)


def test_mixin_keeps_the_as_softmax_behaviour_and_its_delta():
    model = TinyClassifier()
    assert model.as_softmax_loss_name == "as_softmax"
    assert isinstance(model.as_softmax_criterion, ASSoftmaxLoss)
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 0.8, 0.0, 0.0]])
    target = torch.tensor([0, 0])
    model.as_softmax_delta = 1.0  # what DeltaWarmup does between batches
    torch.testing.assert_close(model.as_softmax_loss(logits, target), F.cross_entropy(logits, target))
    model.as_softmax_delta = 0.1
    expected = ref_as_softmax_rows(logits, target, 0.1).mean()
    torch.testing.assert_close(model.as_softmax_loss(logits, target), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": "arc_face"}, ValueError, "Known losses: softmax, t_softmax"),
        ({"loss": "sparse_softmax", "loss_kwargs": {"topk": 3}}, TypeError, "unexpected key.*topk.*accepts: k"),
        ({"loss": "sparse_softmax", "loss_kwargs": {"k": 0}}, ValueError, "k must be a positive int"),
        ({"loss": "as_softmax", "loss_kwargs": {"delta": 0.2}}, ValueError, "must not set delta"),
        ({"loss": "softmax", "loss_kwargs": {"ignore_index": 0}}, ValueError, "must not set ignore_index"),
        ({"loss": "softmax", "loss_kwargs": [("k", 1)]}, TypeError, "loss_kwargs must be a mapping"),
        ({"loss": "sparsemax", "multilabel": True}, ValueError, "no multi-label form"),
        ({"loss": "softmax", "multilabel": True, "loss_kwargs": {"x": 1}}, ValueError, "multi-label"),
    ],
)
def test_mixin_validates_loss_and_kwargs_at_construction(kwargs, error, match):
    class Plain(ASSoftmaxMixin, L.LightningModule):
        pass

    with pytest.raises(error, match=match):
        Plain(**kwargs)


def test_mixin_multilabel_softmax_is_the_delta_one_base_loss():
    from lightning_assoftmax.functional import multilabel_as_softmax_loss

    class MultiLabel(ASSoftmaxMixin, L.LightningModule):
        pass

    model = MultiLabel(multilabel=True, loss="softmax", delta=0.1)
    assert model.as_softmax_criterion is None and not model.as_softmax_reports_masked
    scores = torch.tensor([[5.0, -5.0, -5.0], [0.3, 0.1, -0.2]])
    target = torch.tensor([[1, 0, 0], [1, 1, 0]])
    torch.testing.assert_close(
        model.as_softmax_loss(scores, target), multilabel_as_softmax_loss(scores, target, 1.0)
    )


def test_hyperparameters_survive_a_checkpoint(tmp_path):
    train, val = tiny_loaders()
    model = TinyClassifier(loss="sparse_softmax", loss_kwargs={"k": 2})
    assert model.hparams.loss == "sparse_softmax" and model.hparams.loss_kwargs == {"k": 2}
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, train, val)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = TinyClassifier.load_from_checkpoint(path)
    assert restored.as_softmax_loss_name == "sparse_softmax"
    assert restored.as_softmax_criterion.k == 2


@needs_entmax
def test_delta_warmup_refuses_a_loss_without_delta():
    train, val = tiny_loaders()
    model = TinyClassifier(loss="sparsemax")
    trainer = tiny_trainer(max_epochs=1, callbacks=[DeltaWarmup(warmup_fraction=0.5)])
    with pytest.raises(ValueError, match="loss='sparsemax', which has no delta"):
        trainer.fit(model, train, val)
