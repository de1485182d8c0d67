"""The large-margin family (``l_softmax``, ``sphereface``, ``l2_softmax``, ``normface``, ``cosface``,
``arcface``, ``weighted_softmax``, and ``am_softmax``'s ``delta``), its heads, its composition with
AS-Softmax and ``MarginAnnealing``.

References, never the implementation's own output: ``pytorch-metric-learning``'s losses with the
same class weights and embeddings (value and gradient), plain arithmetic with ``acos`` / ``cos``
(an independent route to the margin logits), ``F.cross_entropy(weight=...)``, hand-computed cases,
and the plain AS-Softmax of ``tests/reference.py``.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import XYSteps
from reference import MARGIN_KWARGS, reference_as_softmax, reference_margin_logits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_assoftmax import ASSoftmaxMixin, MarginAnnealing, build_loss, classifier_head
from lightning_assoftmax.family import (
    CosineClassifier,
    MarginLoss,
    NormalizedFeatureClassifier,
    NormedLogits,
    NormPreservingClassifier,
    angular_margin_psi,
    balanced_class_weights,
    count_class_labels,
)

torch.set_num_threads(1)
# pytorch-metric-learning's L-Softmax passes numpy scalars to scipy (a numpy 2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_metric_learning")

HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None
needs_pml = pytest.mark.skipif(not HAS_PML, reason="needs pytorch-metric-learning (extra 'dev')")

IGNORE = -100
NUM_CLASSES = 5
DIM = 6
NEW_NAMES = ("l_softmax", "sphereface", "l2_softmax", "normface", "cosface", "arcface", "weighted_softmax")
MARGIN_NAMES = ("am_softmax", *NEW_NAMES)
# Settings that make each loss differ from plain softmax on 5 classes.
KWARGS = {**MARGIN_KWARGS, "weighted_softmax": {"weight": [1.0, 0.5, 2.0, 3.0, 0.25]}}


# -- inputs: features through the loss's own head -------------------------------------------------
def make_case(name: str, n: int = 14, seed: int = 0, dtype=torch.float64):
    """Features ``(n, DIM)``, the loss's head (``dtype``), a target with two ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    head = classifier_head(DIM, NUM_CLASSES, loss=name).to(dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    features = torch.randn(n, DIM, generator=gen, dtype=dtype) * 2.0
    target = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    target[1] = IGNORE
    target[n - 2] = IGNORE
    return features, head, target


def loss_of(name: str, features, head, target, **kwargs):
    return build_loss(name, **{**KWARGS[name], **kwargs})(head(features), target)


# -- independent margin logits (acos / cos arithmetic on the non-ignored rows) ----------------------
def ref_margin_logits(name: str, features: torch.Tensor, head: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """The logits each loss takes cross entropy of, written from the papers' formulas."""
    if name == "weighted_softmax":
        return features @ head.weight.T + head.bias
    bias = getattr(head, "bias", None)
    return reference_margin_logits(name, features, head.weight, bias, target, **KWARGS[name])


def ref_rows(name: str, features, head, target, delta: float | None = None) -> torch.Tensor:
    margin = ref_margin_logits(name, features, head, target)
    if delta is None:
        rows = F.cross_entropy(margin, target, reduction="none")
    else:
        rows = reference_as_softmax(margin, target, delta, reduction="none")
    if name == "weighted_softmax":
        rows = rows * torch.tensor(KWARGS[name]["weight"], dtype=rows.dtype)[target]
    return rows


@pytest.mark.parametrize("name", MARGIN_NAMES)
@pytest.mark.parametrize("delta", [None, 0.3])
def test_matches_the_papers_formulas_value_and_gradient(name, delta):
    features, head, target = make_case(name)
    valid = target != IGNORE
    x = features.clone().requires_grad_(True)
    got = loss_of(name, x, head, target, delta=delta, reduction="none")
    x_ref = features[valid].clone().requires_grad_(True)
    head_ref = classifier_head(DIM, NUM_CLASSES, loss=name).double()
    head_ref.load_state_dict(head.state_dict())
    expected = ref_rows(name, x_ref, head_ref, target[valid], delta)
    assert got.shape == target.shape and got.dtype == torch.float64
    torch.testing.assert_close(got[valid], expected.detach())
    assert torch.equal(got[~valid], torch.zeros(2, dtype=torch.float64))
    weights = torch.linspace(0.5, 2.0, int(valid.sum()), dtype=torch.float64)
    (got[valid] * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad[valid], x_ref.grad)
    assert torch.equal(x.grad[~valid], torch.zeros_like(x.grad[~valid]))
    for (key, p), p_ref in zip(head.named_parameters(), head_ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=key)


def test_the_cases_cover_every_branch_of_psi_and_the_arcface_fallback():
    features, head, target = make_case("l_softmax", n=200, seed=1)
    valid = target != IGNORE
    logits = head(features)
    cosine = (logits.detach()[valid, target[valid]] / (features[valid].norm(dim=1) * head.weight[target[valid]].norm(dim=1)))
    k = torch.floor(torch.acos(cosine) * 3 / math.pi)
    assert set(k.tolist()) == {0.0, 1.0, 2.0}
    # arcface's fallback, theta_t + m > pi, needs features opposite to the target's weight
    features, head, target = make_case("arcface", n=8, seed=2)
    features[0] = -head.weight[target[0]].detach()
    cosine = F.cosine_similarity(features[0], head.weight[target[0]].detach(), dim=0)
    assert math.acos(max(-1.0, float(cosine))) + 0.5 > math.pi


def test_arcface_fallback_is_covered_by_the_reference_comparison():
    features, head, target = make_case("arcface", n=8, seed=2)
    features[0] = -head.weight[target[0]].detach() + 0.01  # theta_t near pi
    features[3] = -head.weight[target[3]].detach() * 3 + 0.2
    valid = target != IGNORE
    got = loss_of("arcface", features, head, target, reduction="none")[valid]
    expected = ref_rows("arcface", features[valid], head, target[valid])
    torch.testing.assert_close(got, expected.detach())


def test_arcface_fallback_drops_below_the_margin_branch_at_pi_minus_m():
    # The published fallback s (c - m sin m) is not continuous with s cos(theta + m): at
    # theta = pi - m it lies s (cos m + m sin m - 1) lower (0.1173 s at m = 0.5), and it keeps
    # decreasing in theta past that point.
    m, s, eps = 0.5, 1.0, 1e-6
    loss = build_loss("arcface", scale=s, margin=m)
    thetas = torch.tensor([math.pi - m - eps, math.pi - m + eps, math.pi - m + 0.1], dtype=torch.float64)
    cosines = torch.stack([torch.cos(thetas), torch.zeros_like(thetas)], dim=1)
    target_logit = loss.margin_logits(cosines, torch.zeros(3, dtype=torch.long))[:, 0]
    before, after, further = target_logit.tolist()
    assert before == pytest.approx(-1.0, abs=1e-5)
    assert after == pytest.approx(-math.cos(m) - m * math.sin(m), abs=1e-5)
    assert before - after == pytest.approx(math.cos(m) + m * math.sin(m) - 1, abs=1e-5)
    assert further < after


# -- pytorch-metric-learning as the reference -------------------------------------------------------
def _pml_pair(name: str, pml_class: str, ours: dict, theirs: dict, seed: int = 0):
    from pytorch_metric_learning import losses as pml

    features, head, target = make_case(name, seed=seed)
    reference = getattr(pml, pml_class)(num_classes=NUM_CLASSES, embedding_size=DIM, **theirs).double()
    with torch.no_grad():
        reference.W.copy_(head.weight.T)  # it owns W as (embedding_size, num_classes)
    valid = target != IGNORE
    x = features.clone().requires_grad_(True)
    x_ref = features[valid].clone().requires_grad_(True)
    got = build_loss(name, **ours)(head(x), target)
    expected = reference(x_ref, target[valid])
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad[valid], x_ref.grad)
    assert torch.equal(x.grad[~valid], torch.zeros_like(x.grad[~valid]))
    torch.testing.assert_close(head.weight.grad, reference.W.grad.T)


@needs_pml
@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_l_softmax_equals_pml_large_margin_softmax_loss(margin):
    # lam = 0 is the loss as written, which is what pytorch-metric-learning computes (scale 1).
    _pml_pair("l_softmax", "LargeMarginSoftmaxLoss", {"margin": margin}, {"margin": margin, "scale": 1})


@needs_pml
@pytest.mark.parametrize("margin", [2, 4])
def test_sphereface_equals_pml_sphereface_loss(margin):
    _pml_pair("sphereface", "SphereFaceLoss", {"margin": margin}, {"margin": margin, "scale": 1})


@needs_pml
@pytest.mark.parametrize("name", ["cosface", "am_softmax"])
def test_cosface_equals_pml_cosface_loss(name):
    _pml_pair(name, "CosFaceLoss", {"scale": 64.0, "margin": 0.35}, {"scale": 64, "margin": 0.35})


@needs_pml
@pytest.mark.parametrize("seed", [0, 3])
def test_arcface_equals_pml_arcface_loss_with_the_margin_in_degrees(seed):
    # ours takes the margin in radians (the paper's 0.5), pytorch-metric-learning in degrees
    _pml_pair("arcface", "ArcFaceLoss", {"scale": 64.0, "margin": 0.5}, {"scale": 64, "margin": math.degrees(0.5)}, seed)


@needs_pml
def test_normface_equals_pml_normalized_softmax_loss_with_scale_one_over_temperature():
    _pml_pair("normface", "NormalizedSoftmaxLoss", {"scale": 20.0}, {"temperature": 0.05})


# -- hand-computed cases ----------------------------------------------------------------------------
def test_l2_softmax_hand_computed():
    head = NormalizedFeatureClassifier(2, 3, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)  # unit: (0.6, 0.8)
    loss = build_loss("l2_softmax", alpha=2.0)(head(x), torch.tensor([0]))
    # head: [0.6, 1.6 + 0.5, -1.4]; times alpha = 2: [1.2, 4.2, -2.8]
    z = [1.2, 4.2, -2.8]
    expected = math.log(sum(math.exp(v) for v in z)) - 1.2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # the features' own norm does not matter
    loss_scaled = build_loss("l2_softmax", alpha=2.0)(head(10 * x.detach()), torch.tensor([0]))
    assert loss_scaled.item() == pytest.approx(expected, abs=1e-12)
    # without a bias this is the paper's form exactly: a linear layer on features rescaled to alpha
    plain = nn.Linear(2, 3, bias=False).double()
    head_nb = NormalizedFeatureClassifier(2, 3, bias=False).double()
    with torch.no_grad():
        plain.weight.copy_(head.weight)
        head_nb.weight.copy_(head.weight)
    rescaled = 2.0 * x.detach() / x.detach().norm()
    torch.testing.assert_close(
        build_loss("l2_softmax", alpha=2.0)(head_nb(x), torch.tensor([0])),
        F.cross_entropy(plain(rescaled), torch.tensor([0])),
    )


def test_weighted_softmax_hand_computed_and_equal_to_cross_entropy_with_weights():
    z = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    loss = build_loss("weighted_softmax", weight=[2.0, 1.0], reduction="none")(z, target)
    # row 0: 2 * log 2; row 1: 1 * (log 4 - log 3)
    torch.testing.assert_close(loss, torch.tensor([2 * math.log(2.0), math.log(4.0 / 3.0)], dtype=torch.float64))
    mean = build_loss("weighted_softmax", weight=[2.0, 1.0])(z, target)
    assert mean.item() == pytest.approx((2 * math.log(2.0) + math.log(4.0 / 3.0)) / 3.0, abs=1e-12)

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(20, 4, 3, generator=gen, dtype=torch.float64)  # (N, C, d1) too
    target = torch.randint(0, 4, (20, 3), generator=gen)
    target[0, 1] = target[5, 2] = IGNORE
    weight = torch.tensor([0.3, 1.0, 2.5, 0.0], dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        got = build_loss("weighted_softmax", weight=weight, reduction=reduction)(a, target)
        expected = F.cross_entropy(b, target, weight=weight, reduction=reduction)
        torch.testing.assert_close(got, expected)
        got.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_balanced_weights_hand_computed_and_set_from_counts():
    # 60 samples in 3 classes: 60 / (3 * n_c)
    torch.testing.assert_close(
        balanced_class_weights([30, 10, 20]), torch.tensor([2 / 3, 2.0, 1.0], dtype=torch.float64)
    )
    z = torch.randn(6, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 2, 0, IGNORE])
    loss = build_loss("weighted_softmax", class_counts=[30, 10, 20])
    expected = F.cross_entropy(z, target, weight=torch.tensor([2 / 3, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(loss(z, target), expected)
    later = build_loss("weighted_softmax")
    assert later.needs_class_counts
    with pytest.raises(ValueError, match="needs the training split's class counts"):
        later(z, target)
    later.set_class_counts(torch.tensor([30, 10, 20]))
    assert not later.needs_class_counts
    torch.testing.assert_close(later(z, target), expected)
    assert count_class_labels([0, 2, torch.tensor(2), torch.tensor([1, IGNORE, 1])], 3).tolist() == [1, 2, 2]


def test_l_softmax_hand_computed_with_annealing_weight():
    head = NormPreservingClassifier(2, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, math.sqrt(3.0)]], dtype=torch.float64)  # |x| = 2, theta_0 = pi/3
    target = torch.tensor([0])
    # z = [2, sqrt 3]; |W_0||x| = 4; m = 2: theta_0 = pi/3 lies in [0, pi/2], so k = 0 and
    # psi = cos(2 pi/3) = -0.5: the margin target logit is 4 * -0.5 = -2, mixed with z_0 = 2 by lam
    for lam, target_logit in ((0.0, -2.0), (1.0, (2.0 - 2.0) / 2.0), (3.0, (3 * 2.0 - 2.0) / 4.0)):
        loss = build_loss("l_softmax", margin=2, lam=lam)(head(x), target)
        expected = math.log(math.exp(target_logit) + math.exp(math.sqrt(3.0))) - target_logit
        assert loss.item() == pytest.approx(expected, abs=1e-12), lam
    # psi's branches: m = 3 at theta = 2 pi/3 + eps is k = 2: psi = cos(3 theta) - 4
    theta = torch.tensor([0.1, 1.2, 2.2, math.pi], dtype=torch.float64)
    k = torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    expected_psi = (-1.0) ** k * torch.cos(3 * theta) - 2 * k
    torch.testing.assert_close(angular_margin_psi(theta.cos(), 3), expected_psi)


def test_margin_one_is_plain_softmax_of_the_heads_logits():
    for name in ("l_softmax", "sphereface"):
        features, head, target = make_case(name)
        logits = head(features)
        torch.testing.assert_close(
            build_loss(name, margin=1)(logits, target),
            F.cross_entropy(logits.as_subclass(torch.Tensor), target, ignore_index=IGNORE),
        )


# -- composition with AS-Softmax ------------------------------------------------------------------
@pytest.mark.parametrize("name", MARGIN_NAMES)
def test_delta_one_equals_the_margin_loss_and_counts_no_masked_sample(name):
    features, head, target = make_case(name, seed=7)
    a = features.clone().requires_grad_(True)
    b = features.clone().requires_grad_(True)
    composed = build_loss(name, **KWARGS[name], delta=1.0)
    plain = build_loss(name, **KWARGS[name])
    assert composed.produces_masked_samples and not plain.produces_masked_samples
    loss, masked, valid = composed.loss_and_stats(head(a), target)
    expected = plain(head(b), target)
    torch.testing.assert_close(loss, expected)
    assert masked.item() == 0 and valid.item() == int((target != IGNORE).sum())
    loss.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("name", MARGIN_NAMES)
def test_masked_samples_are_counted_only_with_delta_and_get_zero_gradient(name):
    # Features on the target's weight direction with a large norm: the margin is won by far.
    features, head, target = make_case(name, seed=11)
    valid = target != IGNORE
    with torch.no_grad():
        direction = F.normalize(head.weight, dim=1)[target.clamp(min=0)]
        features[valid] = 40.0 * direction[valid]
        features[3] = features[3].neg()  # one sample pointing away: never masked
    kwargs = dict(KWARGS[name])
    if name in ("l_softmax", "sphereface"):
        kwargs["margin"] = 2
    z = features.clone().requires_grad_(True)
    rows, masked, count = build_loss(name, **kwargs, delta=0.1, reduction="none").loss_and_stats(head(z), target)
    zero = (rows == 0) & valid
    assert masked.item() == int(zero.sum()) >= 1 and not zero[3]
    rows.sum().backward()
    assert torch.equal(z.grad[zero], torch.zeros_like(z.grad[zero]))
    assert z.grad[3].abs().sum() > 0
    _, masked_plain, _ = build_loss(name, **kwargs).loss_and_stats(head(features), target)
    assert masked_plain.item() == 0


def test_the_mask_is_decided_on_the_margin_logits():
    # cosines (0.9, 0.8): plain softmax of 10 c has p_t - p_1 = 0.46 > 0.4, so class 1 would be
    # dropped; with the margin 0.2 the target trails (p_t < p_1) and class 1 stays.
    cosines = torch.tensor([[0.9, 0.8]], dtype=torch.float64)
    target = torch.tensor([0])
    loss = build_loss("cosface", scale=10.0, margin=0.2, delta=0.4)(cosines, target)
    margin_logits = torch.tensor([[7.0, 8.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, F.cross_entropy(margin_logits, target))
    assert loss.item() > 1.0


# -- ignore_index, reductions, layouts, dtypes ------------------------------------------------------
@pytest.mark.parametrize("name", NEW_NAMES)
def test_ignored_rows_get_no_gradient_even_when_their_logits_are_nan(name):
    features, head, target = make_case(name)
    out = head(features)
    carried = {}
    if isinstance(out, NormedLogits):
        weight_norm = None if out.weight_norm is None else out.weight_norm.detach()
        carried = {"feature_norm": out.feature_norm.detach().clone(), "weight_norm": weight_norm}
    logits = out.detach().clone()
    logits[1] = float("nan")
    z = logits.clone().requires_grad_(True)
    fed = NormedLogits.wrap(z, carried["feature_norm"], carried["weight_norm"]) if carried else z
    if carried:
        carried["feature_norm"][1] = float("nan")
    loss = build_loss(name, **KWARGS[name])(fed, target)
    assert torch.isfinite(loss)
    loss.backward()
    ignored = target == IGNORE
    assert torch.equal(z.grad[ignored], torch.zeros_like(z.grad[ignored]))
    assert z.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("name", NEW_NAMES)
def test_reductions_and_all_ignored_batches(name):
    features, head, target = make_case(name)
    valid = target != IGNORE
    none = loss_of(name, features, head, target, reduction="none")
    total = loss_of(name, features, head, target, reduction="sum")
    mean = loss_of(name, features, head, target, reduction="mean")
    torch.testing.assert_close(total, none.sum())
    if name == "weighted_softmax":  # the mean over the targets' weights, as F.cross_entropy
        weights = torch.tensor(KWARGS[name]["weight"], dtype=torch.float64)[target[valid]]
        torch.testing.assert_close(mean, none.sum() / weights.sum())
    else:
        torch.testing.assert_close(mean, none[valid].sum() / valid.sum())
    everything_ignored = torch.full_like(target, IGNORE)
    for reduction in ("mean", "sum"):
        x = features.clone().requires_grad_(True)
        loss = loss_of(name, x, head, everything_ignored, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", NEW_NAMES)
def test_token_layout_through_the_head_equals_flattened_rows(name):
    # (N, L, D) features -> head -> (N, L, C) -> transpose(1, 2): the F.cross_entropy layout
    features, head, target = make_case(name, n=15, seed=5)
    tokens = features.reshape(3, 5, DIM)
    criterion = build_loss(name, **KWARGS[name], reduction="none")
    logits = head(tokens).transpose(1, 2)
    assert logits.shape == (3, NUM_CLASSES, 5)
    got = criterion(logits, target.reshape(3, 5))
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.reshape(-1), criterion(head(features), target))


@pytest.mark.parametrize("name", NEW_NAMES)
def test_half_precision_is_computed_in_float32(name):
    features, head, target = make_case(name, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
    assert logits.dtype == torch.bfloat16
    criterion = build_loss(name, **KWARGS[name])
    loss = criterion(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, criterion(logits.float(), target))


# -- heads and the carried norms --------------------------------------------------------------------
def test_classifier_head_gives_each_loss_its_layer_and_argmax_is_the_prediction():
    expected = {
        "am_softmax": CosineClassifier,
        "cosface": CosineClassifier,
        "normface": CosineClassifier,
        "arcface": CosineClassifier,
        "l_softmax": NormPreservingClassifier,
        "sphereface": NormPreservingClassifier,
        "l2_softmax": NormalizedFeatureClassifier,
        "weighted_softmax": nn.Linear,
    }
    for name, kind in expected.items():
        head = classifier_head(DIM, NUM_CLASSES, loss=name)
        assert type(head) is kind, name
        x = torch.randn(30, DIM)
        out = head(x)
        assert out.shape == (30, NUM_CLASSES)
        scores = build_loss(name, **KWARGS[name]).predictive_logits(out)
        assert torch.equal(scores.argmax(dim=1), out.argmax(dim=1)), name
    sphere = classifier_head(DIM, NUM_CLASSES, loss="sphereface")
    x = torch.randn(4, DIM)
    # |x| cos(theta_j), with unit class weights and no bias
    cosines = F.normalize(x, dim=1) @ F.normalize(sphere.weight, dim=1).T
    torch.testing.assert_close(sphere(x).as_subclass(torch.Tensor), x.norm(dim=1, keepdim=True) * cosines)
    assert sphere(x).weight_norm is None
    assert not any(name.endswith("bias") for name, _ in classifier_head(DIM, 3, loss="l_softmax").named_parameters())


def test_normed_logits_keep_their_norms_through_layout_ops_only():
    head = NormPreservingClassifier(DIM, NUM_CLASSES)
    x = torch.randn(2, 3, DIM, requires_grad=True)
    logits = head(x)
    assert logits.feature_norm.shape == (2, 3, 1) and logits.weight_norm.shape == (1, 1, NUM_CLASSES)
    torch.testing.assert_close(logits.feature_norm.squeeze(-1), x.detach().norm(dim=-1))
    moved = logits.transpose(1, 2).contiguous().double()
    assert isinstance(moved, NormedLogits)
    assert moved.feature_norm.shape == (2, 1, 3) and moved.weight_norm.shape == (1, NUM_CLASSES, 1)
    assert moved.feature_norm.dtype == torch.float64
    for other in (logits * 2, logits[:, :1], logits.reshape(6, NUM_CLASSES), logits.detach(), F.relu(logits)):
        assert type(other) is torch.Tensor
    # the norms stay differentiable: the loss's gradient reaches x through them
    build_loss("l_softmax", margin=2)(moved, torch.zeros(2, 3, dtype=torch.long)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_zero_features_give_finite_losses_and_gradients():
    for name in ("l_softmax", "sphereface", "arcface", "l2_softmax"):
        head = classifier_head(DIM, NUM_CLASSES, loss=name)
        x = torch.zeros(3, DIM, requires_grad=True)
        y = torch.tensor([0, 1, 2])
        loss = build_loss(name)(head(x), y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), name
    # cosines at exactly +-1 (theta = 0 or pi): arcface's sqrt(1 - c^2) has a finite gradient
    c = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    loss = build_loss("arcface")(c, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all()


# -- bad arguments and inputs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("l_softmax", {"margin": 2.5}, TypeError, "l_softmax: margin must be a positive integer, got 2.5"),
        ("l_softmax", {"margin": True}, TypeError, "margin must be a positive integer"),
        ("l_softmax", {"margin": 0}, ValueError, "margin must be a positive integer, got 0"),
        ("sphereface", {"margin": 4.0}, TypeError, "sphereface: margin must be a positive integer"),
        ("l_softmax", {"lam": -1.0}, ValueError, r"lam must lie in \[0, inf\), got -1.0"),
        ("arcface", {"margin": -0.1}, ValueError, r"arcface: margin must lie in \[0, 3.14159\)"),
        ("arcface", {"margin": 4.0}, ValueError, "radians"),
        ("arcface", {"scale": -64.0}, ValueError, r"arcface: scale must lie in \(0, inf\)"),
        ("cosface", {"margin": -0.35}, ValueError, "cosface: margin must lie in"),
        ("cosface", {"scale": 0.0}, ValueError, "cosface: scale must lie in"),
        ("normface", {"scale": -1.0}, ValueError, "normface: scale must lie in"),
        ("l2_softmax", {"alpha": 0.0}, ValueError, r"l2_softmax: alpha must lie in \(0, inf\)"),
        ("arcface", {"delta": 1.5}, ValueError, r"delta must lie in \[0, 1\]"),
        ("weighted_softmax", {"weight": "balancd"}, ValueError, "'balanced' or one weight per class"),
        ("weighted_softmax", {"weight": [1.0, -2.0]}, ValueError, r"finite and >= 0, got \[-2.0\]"),
        ("weighted_softmax", {"weight": [0.0, 0.0]}, ValueError, "at least one class weight must be positive"),
        ("weighted_softmax", {"class_counts": [4, 0, 2]}, ValueError, r"class\(es\) \[1\] have none"),
        ("weighted_softmax", {"class_counts": [1.5, 2.0]}, ValueError, "integer counts"),
        ("weighted_softmax", {"weight": [1.0], "class_counts": [3]}, ValueError, "only used with weight='balanced'"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_loss(name, **kwargs)


def test_bad_inputs_name_the_fix():
    x, y = torch.randn(4, DIM), torch.tensor([0, 1, 2, 3])
    plain = nn.Linear(DIM, NUM_CLASSES)(x)
    for name in ("l_softmax", "sphereface"):
        with pytest.raises(ValueError, match=rf"needs the norms.*classifier_head\(in_features, num_classes, loss='{name}'\)"):
            build_loss(name)(plain, y)
    with pytest.raises(ValueError, match="sphereface needs unit-norm class weights"):
        build_loss("sphereface")(classifier_head(DIM, NUM_CLASSES, loss="l_softmax")(x), y)
    for name in ("arcface", "normface", "cosface"):
        with pytest.raises(ValueError, match=rf"{name} expects cosine logits in \[-1, 1\].*loss='{name}'"):
            build_loss(name)(plain * 10, y)
    with pytest.raises(ValueError, match="3 class weights but the logits have 5 classes"):
        build_loss("weighted_softmax", weight=[1.0, 2.0, 3.0])(plain, y)
    with pytest.raises(ValueError, match="class index 7"):
        build_loss("arcface")(torch.zeros(2, 5), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="lam must lie in"):
        build_loss("l_softmax").lam = -0.5
    loss = build_loss("normface")
    loss.delta = 0.2
    assert loss.produces_masked_samples
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\]"):
        loss.delta = 2.0


# -- Lightning: the mixin, MarginAnnealing, the CLI ---------------------------------------------------
class MarginClassifier(XYSteps, ASSoftmaxMixin, L.LightningModule):
    def __init__(self, loss: str = "arcface", loss_kwargs: dict | None = None):
        super().__init__(loss=loss, loss_kwargs=loss_kwargs)
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.head = classifier_head(16, 4, loss=loss)

    def forward(self, x):
        return self.head(self.body(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def blob_data(n: int = 96, seed: int = 0, counts: tuple[int, ...] | None = None):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 5, generator=gen) * 3
    if counts is None:
        y = torch.randint(0, 4, (n,), generator=gen)
    else:
        y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    x = centers[y] + torch.randn(len(y), 5, generator=gen)
    return TensorDataset(x, y)


def fit(model, data, **kwargs):
    defaults = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    trainer = L.Trainer(**defaults)
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=48))
    return trainer


MIXIN_KWARGS = {**KWARGS, "l_softmax": {"margin": 2, "lam": 1.0}, "sphereface": {"margin": 2, "lam": 1.0}, "weighted_softmax": {}}


@pytest.mark.parametrize("name", NEW_NAMES)
@pytest.mark.parametrize("delta", [None, 0.2])
def test_mixin_trains_with_each_loss_and_reports_masked_samples_with_delta(name, delta):
    L.seed_everything(0, verbose=False)
    loss_kwargs = {**MIXIN_KWARGS[name], **({} if delta is None else {"delta": delta})}
    model = MarginClassifier(loss=name, loss_kwargs=loss_kwargs)
    data = blob_data()
    trainer = fit(model, data)
    metrics = trainer.callback_metrics
    assert metrics["val/acc"] >= 0.9, name  # four separated clusters
    assert ("val/masked_ratio" in metrics) == (delta is not None)
    assert model.as_softmax_reports_masked == (delta is not None)
    # the logged values: the loss, plain CE of the margin-free scores, accuracy of the head's argmax
    x, y = data.tensors
    with torch.no_grad():
        out = model(x)
        expected_loss = model.as_softmax_criterion(out, y)
        expected_ce = F.cross_entropy(model.as_softmax_criterion.predictive_logits(out), y)
        expected_acc = (out.argmax(1) == y).float().mean()
    trainer.validate(model, DataLoader(data, batch_size=48), verbose=False)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["val/loss"], expected_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["val/ce_loss"], expected_ce.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["val/acc"], expected_acc)


def test_mixin_counts_the_training_labels_for_balanced_weights():
    data = blob_data(counts=(40, 10, 30, 16))
    model = MarginClassifier(loss="weighted_softmax")
    assert model.as_softmax_criterion.needs_class_counts
    fit(model, data, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    torch.testing.assert_close(
        model.as_softmax_criterion.class_weight, balanced_class_weights([40, 10, 30, 16])
    )

    class WithCounts(L.LightningDataModule):
        class_counts = (1, 2, 3, 4)

        def train_dataloader(self):
            return DataLoader(data, batch_size=16)

        def val_dataloader(self):
            return DataLoader(data, batch_size=48)

    model = MarginClassifier(loss="weighted_softmax")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=WithCounts())
    torch.testing.assert_close(model.as_softmax_criterion.class_weight, balanced_class_weights([1, 2, 3, 4]))
    # explicit counts in loss_kwargs win over the data
    model = MarginClassifier(loss="weighted_softmax", loss_kwargs={"class_counts": [5, 5, 5, 5]})
    fit(model, data, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    torch.testing.assert_close(model.as_softmax_criterion.class_weight, torch.ones(4, dtype=torch.float64))


def test_mixin_refuses_delta_in_loss_kwargs_only_for_as_softmax():
    with pytest.raises(ValueError, match="must not set delta"):
        MarginClassifier(loss="as_softmax", loss_kwargs={"delta": 0.2})
    model = MarginClassifier(loss="arcface", loss_kwargs={"delta": 0.2})
    assert model.as_softmax_criterion.delta == 0.2 and model.as_softmax_reports_masked
    with pytest.raises(TypeError, match="unexpected key.*scale_.*accepts: scale, margin, delta"):
        MarginClassifier(loss="arcface", loss_kwargs={"scale_": 2})


def test_margin_annealing_schedule_and_its_place_in_training():
    schedule = MarginAnnealing()
    assert schedule.lam_at(0, 0.0) == 1000.0
    assert schedule.lam_at(75, 0.0) == pytest.approx(100.0)
    assert schedule.lam_at(825, 0.0) == pytest.approx(10.0)
    assert schedule.lam_at(10**6, 5.0) == 5.0  # floored at the configured lam
    assert MarginAnnealing(base=10.0, gamma=1.0, power=2.0).lam_at(4, 0.0) == pytest.approx(10.0 / 25.0)

    seen: list[tuple[str, int, float]] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(("train", trainer.global_step, pl_module.as_softmax_criterion.lam))

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append(("val", trainer.global_step, pl_module.as_softmax_criterion.lam))

    model = MarginClassifier(loss="sphereface", loss_kwargs={"margin": 2, "lam": 5.0})
    annealing = MarginAnnealing(base=100.0, gamma=2.0)
    trainer = fit(model, blob_data(), max_epochs=2, callbacks=[annealing, Spy()])
    train = [(step, lam) for stage, step, lam in seen if stage == "train"]
    # the value used in the batch that ended at global_step s was set at step s - 1
    assert [lam for _, lam in train] == pytest.approx([max(5.0, 100.0 / (1.0 + 2.0 * (step - 1))) for step, _ in train])
    assert train[-1][1] == 5.0 and train[0][1] == 100.0
    assert all(lam == 5.0 for stage, _, lam in seen if stage == "val")
    assert model.as_softmax_criterion.lam == 5.0
    assert "train/margin_lambda" in trainer.callback_metrics


class LamSpy(L.Callback):
    """Listed after ``MarginAnnealing``: the lam each training batch runs with; raises (as an
    out-of-memory error would) at the first batch after optimizer step ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.lams: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.fail_at is not None and trainer.global_step >= self.fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        self.lams.append(pl_module.as_softmax_criterion.lam)


def annealed_fit(model, fail_at=None):
    spy = LamSpy(fail_at)
    fit(model, blob_data(), max_epochs=2, limit_val_batches=0, callbacks=[MarginAnnealing(base=100.0, gamma=2.0), spy])
    return spy.lams


def test_margin_annealing_after_a_fit_that_raised_runs_the_schedule_of_a_fresh_fit():
    kwargs = {"margin": 2, "lam": 5.0}
    want = [max(5.0, 100.0 / (1.0 + 2.0 * step)) for step in range(12)]  # 2 epochs of 6 batches
    L.seed_everything(0, verbose=False)
    assert annealed_fit(MarginClassifier(loss="sphereface", loss_kwargs=kwargs)) == pytest.approx(want)

    model = MarginClassifier(loss="sphereface", loss_kwargs=kwargs)
    with pytest.raises(RuntimeError, match="out of memory"):
        annealed_fit(model, fail_at=3)
    # the loss is back at its configured lam, not at the annealed 100 / 7 of step 3
    assert model.as_softmax_criterion.lam == 5.0
    assert annealed_fit(model) == pytest.approx(want)


def test_margin_annealing_takes_its_floor_from_the_configuration_not_the_loss_state():
    want = [max(5.0, 100.0 / (1.0 + 2.0 * step)) for step in range(12)]
    model = MarginClassifier(loss="l_softmax", loss_kwargs={"margin": 2, "lam": 5.0})
    model.as_softmax_criterion.lam = 40.0  # left there by some earlier schedule
    assert annealed_fit(model) == pytest.approx(want)
    assert model.as_softmax_criterion.lam == 5.0
    # without lam in loss_kwargs the floor is the loss's default, 0
    model = MarginClassifier(loss="l_softmax", loss_kwargs={"margin": 2})
    model.as_softmax_criterion.lam = 40.0
    assert annealed_fit(model) == pytest.approx([100.0 / (1.0 + 2.0 * step) for step in range(12)])
    assert model.as_softmax_criterion.lam == 0.0


@pytest.mark.parametrize(("loss", "loss_kwargs"), [("l_softmax", {"margin": 2}), ("weighted_softmax", {"class_counts": [1, 2, 3, 4]})])
def test_per_batch_glue_reads_no_tensor_value_on_the_host(monkeypatch, loss, loss_kwargs):
    from test_no_host_sync import HostReads

    reads = HostReads(monkeypatch)
    model = MarginClassifier(loss=loss, loss_kwargs=loss_kwargs)
    reads.watch(monkeypatch, model, "as_softmax_loss")
    for entry in ("loss_and_stats", "loss_and_flags"):  # the loss itself
        reads.unwatch(monkeypatch, model.as_softmax_criterion, entry)
    callbacks = []
    if loss == "l_softmax":
        annealing = MarginAnnealing()
        reads.watch(monkeypatch, annealing, "on_train_batch_start", "MarginAnnealing.on_train_batch_start")
        callbacks.append(annealing)
    fit(model, blob_data(), max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    assert reads.reads == []


def test_margin_annealing_refuses_losses_without_lam_and_bad_settings():
    with pytest.raises(ValueError, match="loss='arcface', which has none"):
        fit(MarginClassifier(loss="arcface"), blob_data(), max_epochs=1, callbacks=[MarginAnnealing()])
    with pytest.raises(ValueError, match=r"base must lie in \(0, inf\)"):
        MarginAnnealing(base=0.0)
    with pytest.raises(ValueError, match="gamma must lie in"):
        MarginAnnealing(gamma=-1.0)


def test_delta_warmup_says_a_margin_loss_keeps_its_delta():
    from lightning_assoftmax import DeltaWarmup

    model = MarginClassifier(loss="arcface", loss_kwargs={"delta": 0.2})
    with pytest.raises(ValueError, match="loss='arcface', whose delta .set in loss_kwargs. stays fixed"):
        fit(model, blob_data(), max_epochs=1, callbacks=[DeltaWarmup(warmup_fraction=0.5)])


def test_hyperparameters_survive_a_checkpoint(tmp_path):
    model = MarginClassifier(loss="l_softmax", loss_kwargs={"margin": 3, "lam": 2.0, "delta": 0.3})
    trainer = fit(model, blob_data(), max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = MarginClassifier.load_from_checkpoint(path)
    criterion = restored.as_softmax_criterion
    assert (criterion.name, criterion.margin, criterion.lam, criterion.delta) == ("l_softmax", 3, 2.0, 0.3)
    x = torch.randn(3, 5)
    torch.testing.assert_close(restored(x), model(x))


# -- the CLI on the ready-made text model ------------------------------------------------------------
@pytest.fixture
def cli_dir(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-assoftmax"])
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
    return tmp_path


CLI_QUICK = [
    "--data.max_length=32", "--data.batch_size=8", "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1", "--trainer.max_epochs=1", "--trainer.logger=false",
    "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_NAMES)
def test_cli_fits_the_text_model_with_each_loss(name, cli_dir):
    from lightning_assoftmax.cli import ASSoftmaxCLI

    cli = ASSoftmaxCLI(args=["fit", f"--model.loss={name}", *CLI_QUICK])
    assert cli.trainer.global_step == 2
    assert cli.model.as_softmax_loss_name == name
    assert type(cli.model.head[-1]) is type(classifier_head(4, 5, loss=name))
    for key in ("val/loss", "val/ce_loss", "val/acc"):
        assert torch.isfinite(cli.trainer.callback_metrics[key]), key


@pytest.mark.slow
def test_cli_composed_loss_with_margin_annealing(cli_dir):
    from lightning_assoftmax.cli import ASSoftmaxCLI

    cli = ASSoftmaxCLI(
        args=[
            "fit", "--model.loss=l_softmax", '--model.loss_kwargs={"margin": 2, "delta": 0.5}',
            "--trainer.callbacks+=MarginAnnealing", "--trainer.callbacks.base=50", *CLI_QUICK,
        ]
    )
    criterion = cli.model.as_softmax_criterion
    assert isinstance(criterion, MarginLoss) and criterion.delta == 0.5 and criterion.lam == 0.0
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/masked_ratio"]) <= 1.0
    assert float(metrics["train/margin_lambda"]) == pytest.approx(50.0 / (1 + 0.12))
