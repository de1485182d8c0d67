"""Output layers of ``lightning_assoftmax.heads`` against independent references: torch's
``AdaptiveLogSoftmaxWithLoss``, full softmax cross entropy, per-row formulas written out here, and
the slow plain AS-Softmax of ``reference.py`` applied to each head's full ``log_prob``."""

from __future__ import annotations

import doctest
import heapq
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from reference import reference_as_softmax, reference_keep_mask

from lightning_assoftmax.functional import as_softmax_cross_entropy
from lightning_assoftmax.heads import HEAD_NAMES, build_head

V, H = 60, 16
COUNTS = (1000.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1).round()
COUNTS[torch.randperm(V, generator=torch.Generator().manual_seed(1))[:7]] = 0.0  # never-seen classes
# Class ids in a shuffled frequency order, as WordPiece ids are.
SHUFFLED = COUNTS[torch.randperm(V, generator=torch.Generator().manual_seed(2))]

HEAD_CONFIGS = {
    "dense": ("dense", {}),
    "dense_z_loss": ("dense", {"z_loss": 0.01}),
    "adaptive": ("adaptive", {"cutoffs": [8, 24, 40], "div_value": 2.0}),
    "adaptive_counts": ("adaptive", {"cutoffs": [6, 30], "div_value": 2.0, "head_bias": True, "class_counts": SHUFFLED}),
    "class_based": ("class_based", {"class_counts": SHUFFLED}),
    "class_based_mapping": ("class_based", {"cluster_of": [i % 5 for i in range(V)]}),
    "hierarchical": ("hierarchical", {"class_counts": SHUFFLED}),
    "hierarchical_balanced": ("hierarchical", {"bias": False}),
    "sampled": ("sampled", {"num_samples": 20, "class_counts": SHUFFLED}),
    "nce": ("nce", {"num_samples": 20}),
    "negative_sampling": ("nce", {"objective": "negative_sampling", "num_samples": 20, "proposal": "unigram", "class_counts": SHUFFLED}),
}
TREE_HEADS = ["adaptive", "adaptive_counts", "class_based", "class_based_mapping", "hierarchical", "hierarchical_balanced"]


def make_head(config: str, dtype=torch.float64):
    name, kwargs = HEAD_CONFIGS[config]
    return build_head(name, H, V, **kwargs).to(dtype)


def mixed_batch(head, n: int = 256, dtype=torch.float64):
    """Hidden states of very different confidence, and targets that are the most probable class
    (masked samples), the second or third (partly masked rows) or random (nothing masked)."""
    scale = torch.linspace(0.3, 14.0, n, dtype=dtype).unsqueeze(1)
    hidden = torch.randn(n, H, dtype=dtype) * scale
    with torch.no_grad():
        ranked = head.log_prob(hidden).argsort(dim=1, descending=True)
    pick = torch.arange(n) % 4
    target = torch.where(pick < 3, ranked[torch.arange(n), pick.clamp(max=2)], torch.randint(0, V, (n,)))
    return hidden, target


def test_every_name_is_covered():
    assert {name for name, _ in HEAD_CONFIGS.values()} == set(HEAD_NAMES)


@pytest.mark.parametrize("config", list(HEAD_CONFIGS))
def test_log_prob_rows_sum_to_one_and_predict_is_their_argmax(config):
    head = make_head(config)
    hidden = torch.randn(3, 5, H, dtype=torch.float64) * 4
    log_p = head.log_prob(hidden)
    assert log_p.shape == (3, 5, V)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert torch.equal(head.predict(hidden), log_p.argmax(-1))
    assert torch.equal(head(hidden), log_p)


# -- adaptive: torch.nn.AdaptiveLogSoftmaxWithLoss with the same weights ---------------------------
@pytest.mark.parametrize(
    "cutoffs, div_value, head_bias", [([8, 24, 40], 2.0, False), ([30], 4.0, True), ([1, 2, 59], 1.5, False)]
)
def test_adaptive_equals_torch_adaptive_log_softmax(cutoffs, div_value, head_bias):
    reference = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs, div_value=div_value, head_bias=head_bias).double()
    head = build_head("adaptive", H, V, cutoffs=cutoffs, div_value=div_value, head_bias=head_bias).double()
    head.load_state_dict(reference.state_dict())
    hidden = (torch.randn(200, H, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, V, (200,))

    output, loss = reference(hidden, target)
    mine = head.loss(hidden, target)
    torch.testing.assert_close(mine, loss)
    torch.testing.assert_close(head.loss(hidden, target, reduction="none"), -output)
    torch.testing.assert_close(head.log_prob(hidden), reference.log_prob(hidden))
    assert torch.equal(head.predict(hidden), reference.predict(hidden))

    want = torch.autograd.grad(loss, [hidden, *reference.parameters()], materialize_grads=True)
    got = torch.autograd.grad(mine, [hidden, *head.parameters()], materialize_grads=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_adaptive_with_class_counts_ranks_the_classes_itself():
    reference = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, [6, 30], div_value=2.0).double()
    head = build_head("adaptive", H, V, cutoffs=[6, 30], div_value=2.0, class_counts=SHUFFLED).double()
    head.load_state_dict(reference.state_dict())
    rank = torch.empty(V, dtype=torch.long)
    rank[torch.sort(-SHUFFLED, stable=True).indices] = torch.arange(V)  # class -> frequency rank
    hidden, target = torch.randn(50, H, dtype=torch.float64), torch.randint(0, V, (50,))
    torch.testing.assert_close(head.log_prob(hidden), reference.log_prob(hidden)[:, rank])
    torch.testing.assert_close(head.loss(hidden, target), reference(hidden, rank[target]).loss)
    assert torch.equal(rank[head.predict(hidden)], reference.predict(hidden))


def test_adaptive_adds_ignore_index_reduction_and_half_precision():
    reference = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, [8, 24, 40], div_value=2.0)
    head = build_head("adaptive", H, V, cutoffs=[8, 24, 40], div_value=2.0)
    head.load_state_dict(reference.state_dict())
    hidden, target = torch.randn(64, H), torch.randint(0, V, (64,))
    target[::3] = -100
    valid = target != -100
    torch.testing.assert_close(head.loss(hidden, target), reference(hidden[valid], target[valid]).loss)
    torch.testing.assert_close(head.loss(hidden, target, reduction="sum"), reference(hidden[valid], target[valid]).loss * valid.sum())
    rows = head.loss(hidden, target, reduction="none")
    assert rows.shape == (64,) and torch.all(rows[~valid] == 0)

    exact = reference(hidden[valid], target[valid]).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):  # what torch's module lacks
            reference(hidden[valid], target[valid])
        autocast_loss = head.loss(hidden, target)
    assert autocast_loss.dtype == torch.float32
    torch.testing.assert_close(autocast_loss, exact, rtol=2e-2, atol=2e-2)
    half = build_head("adaptive", H, V, cutoffs=[8, 24, 40], div_value=2.0)
    half.load_state_dict(reference.state_dict())
    half = half.to(torch.bfloat16)
    half_loss = half.loss(hidden.bfloat16(), target)
    assert half_loss.dtype == torch.float32 and half.log_prob(hidden.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(half_loss, exact, rtol=2e-2, atol=2e-2)


# -- AS-Softmax on the tree-shaped heads: exact -------------------------------------------------------
@pytest.mark.parametrize("config", TREE_HEADS + ["dense"])
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.1, 0.3, 1.0])
def test_as_softmax_on_the_head_equals_as_softmax_of_its_log_prob(config, delta):
    head = make_head(config)
    hidden, target = mixed_batch(head)
    hidden.requires_grad_()
    target[5] = -100
    weights = torch.rand(target.shape, dtype=torch.float64)

    mine = head.loss(hidden, target, delta=delta, reduction="none")
    log_p = head.log_prob(hidden)
    want = reference_as_softmax(log_p, target, delta, reduction="none")
    torch.testing.assert_close(mine, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mine, as_softmax_cross_entropy(log_p, target, delta, reduction="none"), rtol=1e-9, atol=1e-10)

    params = [hidden, *head.parameters()]
    got = torch.autograd.grad((mine * weights).sum(), params, materialize_grads=True, retain_graph=True)
    expected = torch.autograd.grad((want * weights).sum(), params, materialize_grads=True)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)

    # Masked samples: exact zero loss and exact zero gradient.
    masked = (mine == 0) & (target != -100)
    if delta < 1:
        assert masked.sum() > 10
        assert torch.all(got[0][masked] == 0)
    assert int(head.loss_and_stats(hidden, target, delta=delta)[1]) == int(masked.sum())


@pytest.mark.parametrize("config", ["adaptive", "class_based", "hierarchical"])
def test_the_identity_covers_pruned_and_partly_kept_clusters(config):
    """The batch of the test above holds the cases the pruning must get right."""
    head = make_head(config)
    hidden, target = mixed_batch(head)
    log_p = head.log_prob(hidden).detach()
    keep = reference_keep_mask(log_p, target, 0.1)
    kept = keep.sum(dim=1)
    p_t = log_p.exp().gather(1, target[:, None]).squeeze(1)
    assert ((p_t > 0.1) & (kept == 1)).any()  # masked samples
    assert ((p_t > 0.1) & (kept > 1) & (kept < V)).any()  # partly masked rows
    if config != "hierarchical":
        cluster_of = _cluster_of_class(head)
        clusters = [set(cluster_of[keep[r]].tolist()) for r in range(len(target))]
        # Rows that keep classes outside the target's cluster, and tail targets whose cluster
        # keeps nothing else.
        assert any(len(c) > 1 for c, p in zip(clusters, p_t, strict=True) if p > 0.1)
        tail = cluster_of[target] >= 0
        alone = torch.tensor([keep[r][cluster_of == cluster_of[target[r]]].sum() == 1 for r in range(len(target))])
        assert (tail & alone & (p_t > 0.1) & (kept > 1)).any()


def _cluster_of_class(head) -> torch.Tensor:
    """Cluster of each class, -1 for a direct (shortlist) class, from the slot layout."""
    slot = head.slot_of_class
    return torch.bucketize(slot, head._bounds, right=True) - 1


def test_tree_heads_skip_the_clusters_as_softmax_masks():
    """The point of the bound: a confident row never scores a cluster it masks whole."""
    head = make_head("class_based")
    scored: list[int] = []
    scorer = head.cluster_scorer

    def counting_scorer():
        inner = scorer()

        def scores(cluster, hidden):
            scored.append(hidden.shape[0])
            return inner(cluster, hidden)

        return scores

    head.cluster_scorer = counting_scorer
    hidden = torch.randn(64, H, dtype=torch.float64) * 40
    target = head.predict(hidden)
    head.loss(hidden, target, delta=0.1)
    assert sum(scored) < 2 * 64  # the targets' clusters, and few others
    scored.clear()
    head.log_prob(hidden)
    assert sum(scored) == 64 * sum(1 for k in range(head.num_clusters) if head.cluster_bounds[k + 1] - head.cluster_bounds[k] > 1)


# -- sampled softmax and NCE: plain per-row formulas --------------------------------------------------
def test_sampled_with_every_class_and_a_uniform_proposal_is_full_softmax():
    head = build_head("sampled", H, V, proposal="uniform").double()
    hidden, target = torch.randn(40, H, dtype=torch.float64), torch.randint(0, V, (40,))
    logits = hidden @ head.weight.T + head.bias
    every = torch.arange(V)
    torch.testing.assert_close(head.loss(hidden, target, candidates=every), F.cross_entropy(logits, target))
    want = reference_as_softmax(logits, target, 0.2, reduction="none")
    torch.testing.assert_close(head.loss(hidden, target, delta=0.2, candidates=every, reduction="none"), want)
    # Eval mode: the exact loss of the full distribution.
    head.eval()
    torch.testing.assert_close(head.loss(hidden, target), F.cross_entropy(logits, target))


def _q(proposal: str, counts: torch.Tensor | None) -> torch.Tensor:
    """The proposal written out: uniform, Zipf over frequency ranks, counts ** 0.75."""
    if proposal == "uniform":
        return torch.full((V,), 1.0 / V, dtype=torch.float64)
    if proposal == "log_uniform":
        order = torch.sort(-counts, stable=True).indices if counts is not None else torch.arange(V)
        q = torch.empty(V, dtype=torch.float64)
        for rank, cls in enumerate(order.tolist()):
            q[cls] = (math.log(rank + 2) - math.log(rank + 1)) / math.log(V + 1)
        return q
    weights = counts.clamp(min=1) ** 0.75
    return weights / weights.sum()


@pytest.mark.parametrize("proposal", ["uniform", "log_uniform", "unigram"])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_sampled_loss_is_the_importance_sampling_formula(proposal, z_loss):
    head = build_head("sampled", H, V, proposal=proposal, class_counts=SHUFFLED, z_loss=z_loss).double()
    q = _q(proposal, SHUFFLED)
    torch.testing.assert_close(head.proposal.probs.double(), q, rtol=1e-6, atol=0)
    hidden, target = torch.randn(30, H, dtype=torch.float64), torch.randint(0, V, (30,))
    candidates = torch.cat([target[:4], torch.randint(0, V, (12,)), target[:2]])  # hits and repeats
    logits = (hidden @ head.weight.T + head.bias).detach()
    want = []
    for r, t in enumerate(target.tolist()):
        true = logits[r, t] - math.log(q[t])
        others = [logits[r, c] - math.log(q[c]) for c in candidates.tolist() if c != t]
        row = torch.logsumexp(torch.stack([true, *others]), 0) - true
        if z_loss:
            estimate = sum(math.exp(logits[r, c]) / q[c] for c in candidates.tolist()) / len(candidates)
            row = row + z_loss * math.log(estimate) ** 2
        want.append(row)
    got = head.loss(hidden, target, candidates=candidates, reduction="none")
    torch.testing.assert_close(got, torch.stack(want))


@pytest.mark.parametrize("objective", ["nce", "negative_sampling"])
@pytest.mark.parametrize("remove_hits", [None, True, False])
def test_nce_and_negative_sampling_are_their_per_row_formulas(objective, remove_hits):
    head = build_head("nce", H, V, objective=objective, proposal="log_uniform", remove_accidental_hits=remove_hits).double()
    q = _q("log_uniform", None)
    hidden, target = torch.randn(30, H, dtype=torch.float64), torch.randint(0, V, (30,))
    noise = torch.cat([target[:3], torch.randint(0, V, (9,))])
    k = len(noise)
    removed = (objective == "negative_sampling") if remove_hits is None else remove_hits
    logits = hidden @ head.weight.T + head.bias

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))

    def score(r: int, c: int) -> float:
        z = float(logits[r, c])
        return z - math.log(k * q[c]) if objective == "nce" else z

    want = []
    for r, t in enumerate(target.tolist()):
        row = -log_sigmoid(score(r, t))
        row -= sum(log_sigmoid(-score(r, c)) for c in noise.tolist() if not (removed and c == t))
        want.append(row)
    got = head.loss(hidden, target, candidates=noise, reduction="none")
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    head.eval()
    torch.testing.assert_close(head.loss(hidden, target), F.cross_entropy(logits, target))


def test_nce_starts_self_normalised():
    head = build_head("nce", 64, 5000)
    log_z = torch.logsumexp(head.log_prob(torch.zeros(1, 64)) * 0 + F.linear(torch.randn(8, 64), head.weight, head.bias), dim=1)
    assert log_z.abs().max() < 0.5


@pytest.mark.parametrize("proposal", ["uniform", "log_uniform", "unigram"])
def test_proposals_draw_their_distribution(proposal):
    head = build_head("sampled", H, V, proposal=proposal, class_counts=SHUFFLED, num_samples=200_000)
    drawn = torch.bincount(head.sample_candidates(), minlength=V).double() / 200_000
    q = _q(proposal, SHUFFLED)
    assert (drawn - q).abs().max() < 5 * math.sqrt(float(q.max()) / 200_000)


# -- shared behaviour --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(HEAD_CONFIGS))
def test_ignored_positions_get_no_loss_and_no_gradient(config):
    head = make_head(config)
    hidden = (torch.randn(4, 6, H, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, V, (4, 6))
    target[:, ::2] = -7
    delta = None if config in ("nce", "negative_sampling") else 0.1
    fixed = {"candidates": torch.randint(0, V, (20,))} if config in ("sampled", "nce", "negative_sampling") else {}
    loss = head.loss(hidden, target, delta=delta, ignore_index=-7, reduction="none", **fixed)
    assert loss.shape == (4, 6) and torch.all(loss[:, ::2] == 0)
    loss.sum().backward()
    assert torch.all(hidden.grad[:, ::2] == 0) and hidden.grad[:, 1::2].abs().sum() > 0
    valid = target != -7
    mean = head.loss(hidden[valid], target[valid], delta=delta, **fixed)
    torch.testing.assert_close(head.loss(hidden, target, delta=delta, ignore_index=-7, **fixed), mean)


@pytest.mark.parametrize("config", list(HEAD_CONFIGS))
def test_all_ignored_batch_gives_zero_and_zero_gradients_everywhere(config):
    head = make_head(config)
    hidden = torch.randn(5, H, dtype=torch.float64, requires_grad=True)
    loss, masked, valid = head.loss_and_stats(hidden, torch.full((5,), -100))
    assert loss.item() == 0 and int(masked) == 0 and int(valid) == 0
    loss.backward()
    assert torch.all(hidden.grad == 0)
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in head.parameters())


@pytest.mark.parametrize("config", list(HEAD_CONFIGS))
def test_every_parameter_gets_a_gradient_when_the_batch_holds_one_frequent_class(config):
    """Distributed data parallel expects a gradient for every parameter in every step; a batch of
    the most frequent class alone leaves adaptive's tail clusters, or class_based's class weights
    (a one-class cluster needs none), out of the computation."""
    head = make_head(config)
    top = int(torch.argmax(SHUFFLED)) if HEAD_CONFIGS[config][1].get("class_counts") is SHUFFLED else 0
    hidden, target = torch.randn(16, H, dtype=torch.float64), torch.full((16,), top)
    head.loss(hidden, target).backward()
    assert all(p.grad is not None for p in head.parameters())
    if config == "adaptive":
        assert all(torch.all(p.grad == 0) for p in head.tail.parameters())
        assert head.head.weight.grad.abs().sum() > 0
    if config == "class_based":
        assert torch.all(head.class_weight.grad == 0) and head.cluster_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("ignore_index", [-100, -7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dense_weighted_softmax_reduces_as_cross_entropy_with_weights(reduction, ignore_index):
    weight = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    head = build_head("dense", H, V, loss="weighted_softmax", loss_kwargs={"weight": weight.tolist()}).double()
    hidden = (torch.randn(4, 6, H, dtype=torch.float64) * 2).requires_grad_()
    target = torch.randint(0, V, (4, 6))
    target[:, ::3] = ignore_index
    got = head.loss(hidden, target, ignore_index=ignore_index, reduction=reduction)
    (got_grad,) = torch.autograd.grad(got.sum(), hidden)

    plain = hidden.detach().requires_grad_()
    logits = F.linear(plain, head.linear.weight.detach(), head.linear.bias.detach()).movedim(-1, 1)  # (N, V, L)
    want = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    (want_grad,) = torch.autograd.grad(want.sum(), plain)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    if reduction == "mean":  # the divisor is the targets' total weight, not the 16 rows
        valid = target != ignore_index
        torch.testing.assert_close(head.mean_weight(target, ignore_index=ignore_index), weight[target[valid]].sum())


def test_dense_weighted_softmax_weights_the_z_loss_with_its_row():
    weight = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    head = build_head("dense", H, 4, loss="weighted_softmax", loss_kwargs={"weight": weight.tolist()}, z_loss=0.1).double()
    hidden, target = torch.randn(9, H, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 1, -100, 0, 2])
    valid = target >= 0
    z = head.linear(hidden[valid]).detach()
    w = weight[target[valid]]
    rows = w * (torch.logsumexp(z, 1) - z.gather(1, target[valid, None])[:, 0] + 0.1 * torch.logsumexp(z, 1) ** 2)
    torch.testing.assert_close(head.loss(hidden, target), rows.sum() / w.sum())
    torch.testing.assert_close(head.loss(hidden, target, reduction="sum"), rows.sum())
    # all-zero weights on the batch's targets: a loss of 0, as F.cross_entropy(weight=) gives NaN
    zeros = build_head("dense", H, 4, loss="weighted_softmax", loss_kwargs={"weight": [0.0, 0.0, 1.0, 1.0]}).double()
    assert zeros.loss(hidden[:2], target[:2]).item() == 0.0


def test_huffman_tree_has_the_optimal_expected_path_length():
    head = make_head("hierarchical")
    # A Huffman code's total cost is the sum of the weights of all merges.
    heap = [float(c) for c in SHUFFLED]
    heapq.heapify(heap)
    cost = 0.0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    lengths = head.path_length.double()
    assert float((lengths * SHUFFLED).sum()) == pytest.approx(cost)
    assert head.mean_path_length == pytest.approx(cost / float(SHUFFLED.sum()))
    assert int(lengths.max()) <= 12  # never-seen classes form a balanced subtree, not a chain


def test_given_tree_and_cluster_mapping_are_used():
    tree = [[0, [1, 2]], [3, 4]]
    head = build_head("hierarchical", 8, 5, tree=tree).double()
    hidden = torch.randn(3, 8, dtype=torch.float64)
    score = hidden @ head.node_weight.T + head.node_bias  # nodes breadth first: root, [0,[1,2]], [3,4], [1,2]
    s = F.logsigmoid
    want_1 = s(score[:, 0]) + s(-score[:, 1]) + s(score[:, 3])
    torch.testing.assert_close(head.log_prob(hidden)[:, 1], want_1)
    mapping = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    head = build_head("class_based", 8, 7, cluster_of=mapping).double()
    assert torch.equal(head.cluster_of, mapping)
    log_p = head.log_prob(hidden)
    top = F.log_softmax(hidden @ head.cluster_weight.T + head.cluster_bias, dim=1)
    for k in range(3):
        members = (mapping == k).nonzero().squeeze(1)
        torch.testing.assert_close(torch.logsumexp(log_p[:, members], dim=1), top[:, k])


def test_frequency_bins_balance_the_probability_mass():
    head = build_head("class_based", H, V, class_counts=SHUFFLED, num_clusters=6)
    cluster_of = head.cluster_of
    assert sorted(set(cluster_of.tolist())) == list(range(6))
    mass = torch.zeros(6, dtype=torch.float64).index_add(0, cluster_of, SHUFFLED) / SHUFFLED.sum()
    rank = torch.empty(V, dtype=torch.long)
    rank[torch.sort(-SHUFFLED, stable=True).indices] = torch.arange(V)
    # Runs of the frequency order: cluster ids never decrease with rank.
    assert torch.all(cluster_of[torch.argsort(rank)].diff() >= 0)
    assert float(mass[1:-1].max()) < 2.5 / 6  # no middle cluster takes much more than its share


# -- bad arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("adaptive", {"cutoffs": [20, 10]}, ValueError, r"strictly increasing.*\[20, 10\]"),
        ("adaptive", {"cutoffs": [10, 10]}, ValueError, "strictly increasing"),
        ("adaptive", {"cutoffs": [0, 10]}, ValueError, r"\[1, 59\]"),
        ("adaptive", {"cutoffs": [10, 60]}, ValueError, r"\[1, 59\]"),
        ("adaptive", {"cutoffs": [10.5]}, TypeError, "integers"),
        ("adaptive", {"cutoffs": []}, ValueError, "at least one"),
        ("adaptive", {"cutoffs": "10"}, TypeError, "list"),
        ("adaptive", {"cutoffs": [8, 24], "div_value": 32.0}, ValueError, "div_value"),
        ("adaptive", {"class_counts": [1] * 59}, ValueError, r"60 in all.*\(59,\)"),
        ("class_based", {"class_counts": [1] * 61}, ValueError, "60 in all"),
        ("hierarchical", {"class_counts": [1.0] * 59 + [-1.0]}, ValueError, r">= 0, got -1.0 for class 59"),
        ("sampled", {"class_counts": [[1] * 60]}, ValueError, "one count per class"),
        ("class_based", {"num_clusters": 61}, ValueError, "exceeds num_classes"),
        ("class_based", {"cluster_of": [0] * 30 + [2] * 30}, ValueError, "cluster 1 has no class"),
        ("class_based", {"cluster_of": [0, 1] * 30, "num_clusters": 3}, ValueError, "disagrees"),
        ("hierarchical", {"tree": [[0, 1], 2]}, ValueError, "every class exactly once"),
        ("hierarchical", {"tree": [0, 1, 2]}, ValueError, "pair"),
        ("hierarchical", {"tree": [[0, 1]], "class_counts": COUNTS}, ValueError, "not both"),
        ("sampled", {"proposal": "unigram"}, ValueError, "needs class_counts"),
        ("sampled", {"proposal": "zipf"}, ValueError, "uniform, log_uniform, unigram"),
        ("sampled", {"num_samples": 0}, ValueError, "num_samples"),
        ("nce", {"objective": "infonce"}, ValueError, "nce, negative_sampling"),
        ("dense", {"loss": "cross_entropy"}, ValueError, "Unknown loss"),
        ("dense", {"cutoffs": [3]}, TypeError, r"unexpected keyword argument\(s\) cutoffs"),
    ],
)
def test_bad_arguments_are_refused_clearly(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_head(name, H, V, **kwargs)


def test_bad_calls_are_refused_clearly():
    with pytest.raises(ValueError, match="Unknown head 'softmax'"):
        build_head("softmax", H, V)
    head = make_head("nce")
    hidden, target = torch.randn(4, H, dtype=torch.float64), torch.randint(0, V, (4,))
    with pytest.raises(ValueError, match="takes no delta.*loss='softmax'"):
        head.loss(hidden, target, delta=0.1)
    with pytest.raises(ValueError, match="takes no delta"):
        head.eval().loss(hidden, target, delta=0.1)
    adaptive = make_head("adaptive")
    with pytest.raises(ValueError, match=r"target class 60 is out of range \[0, 60\)"):
        adaptive.loss(hidden, torch.tensor([0, 1, 60, 2]))
    with pytest.raises(ValueError, match=r"leading shape of hidden, \(4,\)"):
        adaptive.loss(hidden, target[:3])
    with pytest.raises(ValueError, match=r"in_features=16"):
        adaptive.loss(hidden[:, :8], target)
    with pytest.raises(TypeError, match="integer tensor"):
        adaptive.loss(hidden, target.double())
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\]"):
        adaptive.loss(hidden, target, delta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        adaptive.loss(hidden, target, reduction="average")
    with pytest.raises(ValueError, match="loss='sparsemax' takes no delta"):
        build_head("dense", H, V, loss="sparsemax").loss(hidden.float(), target, delta=0.1)
    with pytest.raises(ValueError, match=r"candidates must be class ids in \[0, 60\)"):
        make_head("sampled").loss(hidden, target, candidates=torch.tensor([3, 60]))


@pytest.mark.parametrize(
    "module", ["registry", "adaptive", "class_based", "hierarchical", "sampled", "nce", "dense"]
)
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"lightning_assoftmax.heads.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- CUDA (skipped without a GPU) -----------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", list(HEAD_CONFIGS))
def test_heads_on_cuda_match_the_cpu(config):
    cpu = make_head(config)
    cuda = make_head(config).cuda()
    cuda.load_state_dict(cpu.state_dict())
    hidden, target = mixed_batch(cpu, n=128)
    target[3] = -100
    torch.testing.assert_close(cuda.log_prob(hidden.cuda()).cpu(), cpu.log_prob(hidden))
    assert torch.equal(cuda.predict(hidden.cuda()).cpu(), cpu.predict(hidden))
    deltas = [None] if config in ("nce", "negative_sampling") else [None, 0.0, 0.1, 1.0]
    fixed = torch.randint(0, V, (20,))
    for delta in deltas:
        extra = {"candidates": fixed} if config in ("sampled", "nce", "negative_sampling") else {}
        extra_cuda = {k: v.cuda() for k, v in extra.items()}
        h_cpu, h_cuda = hidden.clone().requires_grad_(), hidden.cuda().requires_grad_()
        want = cpu.loss(h_cpu, target, delta=delta, reduction="none", **extra)
        got = cuda.loss(h_cuda, target.cuda(), delta=delta, reduction="none", **extra_cuda)
        torch.testing.assert_close(got.cpu(), want)
        want.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(h_cuda.grad.cpu(), h_cpu.grad)
        for a, b in zip(cuda.parameters(), cpu.parameters(), strict=True):
            torch.testing.assert_close(a.grad.cpu(), b.grad)
        cuda.zero_grad(), cpu.zero_grad()
    if config in ("sampled", "nce", "negative_sampling"):  # candidates drawn on the GPU
        assert torch.isfinite(cuda.loss(hidden.cuda(), target.cuda())).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adaptive_on_cuda_under_autocast_equals_torch_in_float32():
    reference = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, [8, 24, 40], div_value=2.0).cuda()
    head = build_head("adaptive", H, V, cutoffs=[8, 24, 40], div_value=2.0).cuda()
    head.load_state_dict(reference.state_dict())
    hidden, target = torch.randn(256, H, device="cuda"), torch.randint(0, V, (256,), device="cuda")
    exact = reference(hidden, target).loss
    torch.testing.assert_close(head.loss(hidden, target), exact)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head.loss(hidden, target, delta=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, head.loss(hidden, target, delta=0.1), rtol=2e-2, atol=2e-2)
