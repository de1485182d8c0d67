"""One definition of a masked sample everywhere: the keep rule keeps only the target (the paper's;
its code counts rows with C - 1 logits at -inf), never "the loss is exactly 0".

Each case is a confident row whose float32 loss rounds to exactly 0 while its float64 loss does
not: at ``delta = 1`` every class is kept, so it must not count as masked; at ``delta = 0.1`` only
its target is kept, so it must. The references are float64 probabilities and hand-computed values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier

from lightning_assoftmax import build_loss
from lightning_assoftmax.heads import build_head

H, V = 8, 24
HEADS = {
    "dense": {},
    "adaptive": {"cutoffs": [4, 12], "div_value": 2.0},
    "class_based": {"num_clusters": 4},
    "hierarchical": {},
    "sampled": {"num_samples": 6},  # evaluated in eval mode: every class is a candidate
}


def reference_masked(log_p64: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Rows ``(M, C)`` of float64 log-probabilities: only the target kept (p_t - p_i <= delta)."""
    p = log_p64.exp()
    keep = (p.gather(1, target.unsqueeze(1)) - p) <= delta
    keep[torch.arange(len(target)), target] = True
    return keep.sum(dim=1) == 1


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_flag_the_keep_rule_not_a_zero_loss(name):
    torch.manual_seed(0)
    head = build_head(name, H, V, **HEADS[name]).eval()
    # Large hidden states: the most probable class wins by a wide margin.
    hidden = torch.randn(64, H) * 500
    with torch.no_grad():
        target = head.log_prob(hidden).argmax(dim=1)
        log_p64 = head.double().log_prob(hidden.double())
    head.float()
    losses = head.loss(hidden, target, delta=1.0, reduction="none")
    confident = (losses == 0) & (-log_p64.gather(1, target.unsqueeze(1)).squeeze(1) > 0)
    assert confident.any()  # rows a zero-loss rule would have called masked
    for delta in (1.0, 0.1):
        expected = reference_masked(log_p64, target, delta)
        _, masked, valid = head.loss_and_stats(hidden, target, delta=delta)
        assert (masked.item(), valid.item()) == (int(expected.sum()), 64)
        _, flags, _ = head.loss_and_flags(hidden, target, delta=delta)
        assert torch.equal(flags, expected)
    assert not reference_masked(log_p64, target, 1.0).any()
    assert reference_masked(log_p64, target, 0.1)[confident].all()


@pytest.mark.parametrize("name", ["am_softmax", "arcface", "cosface", "l2_softmax", "normface"])
def test_margin_losses_with_delta_flag_the_keep_rule_not_a_zero_loss(name):
    # Cosines; the margin logits of row 0 (scale 30) beat the others by about 34 or more, so its
    # float64 cross entropy is about e^-34 > 0 and its float32 one exactly 0. Row 1 is a close
    # call (or lost to the margin): never masked.
    cosines = torch.tensor([[0.99, -0.5, -0.6], [0.2, 0.199, -0.3]])
    target = torch.tensor([0, 0])
    for delta, expected in ((1.0, [False, False]), (0.1, [True, False])):
        loss = build_loss(name, delta=delta, reduction="none")
        rows, flags, valid = loss.loss_and_flags(cosines, target)
        assert rows[0].item() == 0.0
        assert flags.tolist() == expected and valid.item() == 2
        _, masked, _ = loss.loss_and_stats(cosines, target)
        assert masked.item() == sum(expected)


class FlagTracker(TinyClassifier):
    """Records the per-sample flags as SkipMaskedSamples would, outside a Trainer."""

    def _as_softmax_stage(self):
        return "train"


@pytest.mark.parametrize("delta, expected", [(1.0, [False, False, True]), (0.1, [True, False, True])])
@pytest.mark.parametrize("path", ["logits", "linear", "head"])
def test_skip_masked_samples_flags_follow_the_keep_rule(path, delta, expected):
    # Sample 0: p = softmax([30, 0, 0, 0]), float32 loss exactly 0, float64 about 2.8e-13 > 0.
    # Sample 1: a close call. Sample 2: all positions ignored (no gradient: counts as masked).
    model = FlagTracker(in_features=4, num_classes=4, delta=delta)
    model.as_softmax_track_masked_samples = True
    with torch.no_grad():
        model.net.weight.copy_(torch.eye(4))
        model.net.bias.zero_()
    hidden = torch.tensor([[30.0, 0.0, 0.0, 0.0], [1.0, 0.9, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([0, 0, -100])
    assert 0 < F.cross_entropy(hidden[:1].double(), target[:1]).item() < 1e-12
    assert F.cross_entropy(hidden[:1], target[:1]).item() == 0.0
    if path == "logits":
        model.as_softmax_loss(model(hidden), target, log=False)
    elif path == "linear":
        model.as_softmax_linear_loss(hidden, model.net.weight, target, model.net.bias, log=False)
    else:
        head = build_head("dense", 4, 4)
        with torch.no_grad():
            head.linear.weight.copy_(torch.eye(4))
            head.linear.bias.zero_()
        model.as_softmax_head_loss(head, hidden, target, log=False)
    assert model.as_softmax_last_masked_samples.tolist() == expected
