"""The fused output layer + AS-Softmax loss against the slow reference on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    linear_as_softmax_cross_entropy,
    linear_as_softmax_loss_and_stats,
)
from tests.reference import ignore_rows_near_the_boundary, reference_as_softmax


def make_problem(rows=24, dim=8, classes=40, seed=0, ignore=0.2, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    w = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    b = torch.randn(classes, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, classes, (rows,), generator=g)
    # Make a third of the rows confidently correct (masked samples).
    confident = torch.arange(rows) % 3 == 0
    x[confident] = 3.0 * w[target[confident]]
    target[torch.rand(rows, generator=g) < ignore] = -100
    leaves = [t.to(dtype).requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    return leaves, target


def reference(leaves, target, delta, reduction, weighted=True):
    x, w, *rest = [t.detach().double().requires_grad_() for t in leaves]
    b = rest[0] if rest else None
    logits = F.linear(x, w, b)
    loss = reference_as_softmax(logits, target, delta, reduction=reduction)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    if not weighted:
        upstream = torch.ones_like(upstream)
    (loss * upstream).sum().backward()
    grads = [x.grad, w.grad] + ([b.grad] if b is not None else [])
    return loss.detach(), grads, upstream


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("delta", [0.0, 0.1, 1.0])
def test_value_and_gradients_match_the_reference(reduction, chunk_size, delta):
    leaves, target = make_problem()
    expected, expected_grads, upstream = reference(leaves, target, delta, reduction)
    x, w, b = leaves
    loss = linear_as_softmax_cross_entropy(
        x, w, target, b, delta, reduction=reduction, chunk_size=chunk_size
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-12)
    (loss * upstream).sum().backward()
    for leaf, grad in zip(leaves, expected_grads, strict=True):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-9, atol=1e-12)


def test_masked_rows_have_exactly_zero_gradient_and_are_counted():
    leaves, target = make_problem(ignore=0.0, bias=False)
    x, w = leaves
    loss, masked, valid = linear_as_softmax_loss_and_stats(x, w, target, None, 0.1, reduction="none")
    loss.sum().backward()
    zero = loss.detach() == 0
    assert zero.any() and not zero.all()
    assert masked.item() == zero.sum().item() and valid.item() == len(target)
    assert (x.grad[zero] == 0).all()


def test_leading_dimensions_and_ignored_positions():
    leaves, target = make_problem(rows=24, bias=False)
    x, w = leaves
    x3, t3 = x.detach().reshape(2, 12, -1).requires_grad_(), target.reshape(2, 12)
    loss = linear_as_softmax_cross_entropy(x3, w, t3, reduction="none", chunk_size=7)
    assert loss.shape == (2, 12)
    assert (loss[t3 == -100] == 0).all()
    loss.sum().backward()
    assert (x3.grad[t3 == -100] == 0).all()
    expected = reference_as_softmax(F.linear(x.detach(), w.detach()), target, 0.1, reduction="none")
    torch.testing.assert_close(loss.detach().reshape(-1), expected)


def test_all_ignored_batch_gives_zero_and_a_working_backward():
    leaves, target = make_problem(ignore=1.0)
    x, w, b = leaves
    loss = linear_as_softmax_cross_entropy(x, w, target, b)
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()


def test_retained_graph_gives_the_same_gradient_twice():
    leaves, target = make_problem()
    x, w, b = leaves
    loss = linear_as_softmax_cross_entropy(x, w, target, b, chunk_size=4)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (2 * loss).backward()
    for t, g in zip(leaves, first, strict=True):
        torch.testing.assert_close(t.grad, 2 * g)


def test_without_grad_only_the_loss_is_computed():
    leaves, target = make_problem()
    x, w, b = leaves
    with torch.no_grad():
        loss = linear_as_softmax_cross_entropy(x, w, target, b, reduction="sum")
    expected, *_ = reference(leaves, target, 0.1, "sum")
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_inputs(dtype):
    leaves, target = make_problem(dtype=dtype, classes=64)
    x, w, b = leaves
    loss = linear_as_softmax_cross_entropy(x, w, target, b, chunk_size=8)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    # Reference on the same rounded inputs, in float64; bfloat16 logits and gradients carry
    # 8 bits of mantissa, so compare to a tolerance relative to the gradient's scale.
    expected, grads, _ = reference(leaves, target, 0.1, "mean", weighted=False)
    low = dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected, rtol=3e-2 if low else 1e-5, atol=0)
    for leaf, grad in zip(leaves, grads, strict=True):
        error = (leaf.grad.double() - grad).abs().max() / grad.abs().max()
        assert error < (3e-2 if low else 1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target=torch.tensor([0, 7])), "class index 7"),
        (dict(target=torch.tensor([0.0, 1.0])), "integer tensor"),
        (dict(target=torch.tensor([0, 1, 2])), "target shape"),
        (dict(weight=torch.zeros(5, 4)), "in_features=4"),
        (dict(bias=torch.zeros(4)), r"bias must have shape \(5,\)"),
        (dict(delta=1.5), "delta must lie in"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(weight=torch.zeros(5, 3, dtype=torch.float64)), "same dtype"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(input=torch.zeros(2, 3), weight=torch.zeros(5, 3), target=torch.tensor([0, 1]), bias=None)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_as_softmax_cross_entropy(**args)


def test_module_form_matches_the_reference_and_reports_counts():
    from lightning_assoftmax import LinearASSoftmaxLoss

    leaves, target = make_problem()
    x, w, b = leaves
    criterion = LinearASSoftmaxLoss(delta=0.2, chunk_size=3)
    loss, masked, valid = criterion.loss_and_stats(x, w, target, b)
    expected, grads, _ = reference(leaves, target, 0.2, "mean", weighted=False)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    torch.testing.assert_close(w.grad, grads[1])
    rows = reference_as_softmax(F.linear(x.detach(), w.detach(), b.detach()), target, 0.2, reduction="none")
    assert masked.item() == ((rows == 0) & (target != -100)).sum().item()
    assert valid.item() == (target != -100).sum().item()


@pytest.mark.parametrize("loss_name", ["as_softmax", "softmax"])
def test_token_classifier_trains_through_the_fused_layer(loss_name):
    """TokenClassifier's training loss: the fused layer gives the loss and the parameter gradients
    of the (N, C, L) logits' reference loss, and no saved tensor holds the (N, L, C) logits."""
    from lightning_assoftmax.models import TokenClassifier

    torch.manual_seed(0)
    classes = 300
    model = TokenClassifier(
        num_classes=classes, vocab_size=50, embed_dim=16, hidden_dim=24, loss=loss_name, delta=0.3
    ).double()
    model.eval()  # no dropout: both passes see the same network
    ids = torch.randint(0, 50, (4, 7))
    labels = torch.randint(0, classes, (4, 7))
    labels[0, :3] = -100
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused = model._loss({"input_ids": ids, "labels": labels})
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    logits_shapes = {(4, 7, classes), (4, classes, 7), (28, classes)}
    assert not logits_shapes & set(shapes), shapes
    model.zero_grad()
    logits = model(ids)  # (N, L, C) through the same nn.Linear
    delta = 0.3 if loss_name == "as_softmax" else 1.0
    expected = reference_as_softmax(logits.reshape(-1, classes), labels.reshape(-1), delta, reduction="mean")
    if loss_name == "softmax":
        torch.testing.assert_close(expected, F.cross_entropy(logits.transpose(1, 2), labels))
    expected.backward()
    torch.testing.assert_close(fused, expected.detach())
    for got, want in zip(fused_grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want)


def test_token_classifier_fit_logs_the_mixin_keys_with_the_fused_layer(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_assoftmax.models import TokenClassifier

    g = torch.Generator().manual_seed(0)
    items = [
        {"input_ids": torch.randint(0, 30, (6,), generator=g), "labels": torch.randint(0, 200, (6,), generator=g)}
        for _ in range(16)
    ]
    loader = DataLoader(items, batch_size=4)
    model = TokenClassifier(num_classes=200, vocab_size=30, embed_dim=8, hidden_dim=8, delta=0.5)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    for key in ("train/loss_epoch", "train/masked_ratio_epoch", "val/loss", "val/ce_loss", "val/acc"):
        assert torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["train/masked_ratio_epoch"]) <= 1.0


# --------------------------------------------------------------------------- mixed precision

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def clear_problem(dtype, ignore=0.2):
    """make_problem in float32, without rows whose keep decision rounding to ``dtype`` may flip."""
    leaves, target = make_problem(dtype=torch.float32, classes=30, ignore=ignore)
    rounded = [t.detach().to(dtype).double() for t in leaves]
    return leaves, ignore_rows_near_the_boundary(F.linear(*rounded), target, 0.1, margin=0.02)


def rounded_reference(leaves, target, delta, reduction, dtype):
    """The float64 reference on the inputs rounded to the autocast dtype (what the products see)."""
    rounded = [t.detach().to(dtype).requires_grad_() for t in leaves]
    expected, grads, upstream = reference(rounded, target, delta, reduction)
    return expected, grads, upstream


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, "autocast"])
def test_autocast_matches_the_unfused_layer_and_the_float64_reference(reduction, dtype, hidden_dtype):
    """Under torch.autocast: products in the autocast dtype, loss in float32, each gradient in its
    input's dtype; a hidden state in the autocast dtype meets float32 weights (autocast casts)."""
    leaves, target = clear_problem(dtype)
    if hidden_dtype == "autocast":
        leaves[0] = leaves[0].detach().to(dtype).requires_grad_()
    x, w, b = leaves
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=dtype):
        loss = linear_as_softmax_cross_entropy(x, w, target, b, 0.1, reduction=reduction, chunk_size=7)
        unfused = as_softmax_cross_entropy(F.linear(*twins[:2], twins[2]), target, 0.1, reduction=reduction)
    assert loss.dtype == unfused.dtype == torch.float32
    expected, grads, upstream = rounded_reference(leaves, target, 0.1, reduction, dtype)
    (loss * upstream.float()).sum().backward()
    (unfused * upstream.float()).sum().backward()
    torch.testing.assert_close(loss.detach().double(), expected, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(loss.detach(), unfused.detach(), rtol=2e-2, atol=2e-2)
    for leaf, twin, grad in zip(leaves, twins, grads, strict=True):
        assert leaf.grad.dtype == leaf.dtype == twin.grad.dtype
        scale = grad.abs().max()
        assert (leaf.grad.double() - grad).abs().max() / scale < 3e-2
        assert (leaf.grad.double() - twin.grad.double()).abs().max() / scale < 3e-2


def test_autocast_counts_the_masked_rows_of_the_reference():
    leaves, target = clear_problem(torch.bfloat16, ignore=0.0)
    x, w, b = leaves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, masked, valid = linear_as_softmax_loss_and_stats(x, w, target, b, 0.1, reduction="none")
    rows, _, _ = rounded_reference(leaves, target, 0.1, "none", torch.bfloat16)
    assert masked.item() == ((rows == 0) & (target != -100)).sum().item() > 0
    assert valid.item() == (target != -100).sum().item()
    assert torch.equal(loss.detach() == 0, rows == 0)


def test_mixed_dtypes_outside_autocast_are_refused_without_claiming_autocast_is_on():
    leaves, target = make_problem(dtype=torch.float32, bias=False)
    x, w = leaves
    with pytest.raises(TypeError, match="must have the same dtype") as info:
        linear_as_softmax_cross_entropy(x.detach().bfloat16(), w, target)
    message = str(info.value)
    assert "not enabled for cpu" in message and "input.to(torch.float32)" in message
    assert "does this for you" not in message


def test_float64_input_under_autocast_is_refused_clearly():
    leaves, target = make_problem(dtype=torch.float32, bias=False)
    x, w = leaves
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="leaves float64"):
        linear_as_softmax_cross_entropy(x.detach().double(), w, target)


# --------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises_a_clear_error(reduction):
    """A gradient penalty through the fused layer would silently contribute nothing."""
    leaves, target = make_problem()
    x, w, b = leaves
    loss = linear_as_softmax_cross_entropy(x, w, target, b, 0.1, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # A plain backward still works afterwards.
    loss = linear_as_softmax_cross_entropy(x, w, target, b, 0.1, reduction=reduction).sum()
    loss.backward()
    assert x.grad is not None


class _FusedHeadModel:
    """A tiny mixin module whose output layer goes through ``as_softmax_linear_loss``."""

    @staticmethod
    def build():
        import lightning as L

        from lightning_assoftmax import ASSoftmaxMixin

        class FusedHead(ASSoftmaxMixin, L.LightningModule):
            def __init__(self):
                super().__init__(delta=0.3)
                self.encoder = torch.nn.Linear(8, 16)
                self.head = torch.nn.Linear(16, 40)

            def _loss(self, batch):
                x, y = batch
                return self.as_softmax_linear_loss(torch.tanh(self.encoder(x)), self.head.weight, y, self.head.bias)

            def training_step(self, batch, batch_idx):
                return self._loss(batch)

            def validation_step(self, batch, batch_idx):
                self._loss(batch)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return FusedHead()


@pytest.mark.parametrize("model_name", ["mixin", "token_classifier"])
def test_fused_layer_trains_in_bf16_mixed(model_name, tmp_path):
    """``precision="bf16-mixed"`` (``"16-mixed"`` falls back to it on CPU in Lightning) through the
    mixin's fused ``as_softmax_linear_loss``: the fit runs, the loss is finite and the float32
    parameters move."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_assoftmax.models import TokenClassifier

    g = torch.Generator().manual_seed(0)
    if model_name == "mixin":
        model = _FusedHeadModel.build()
        data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 40, (32,), generator=g))
        loader = DataLoader(data, batch_size=8)
    else:
        model = TokenClassifier(num_classes=200, vocab_size=30, embed_dim=8, hidden_dim=8, delta=0.5)
        items = [
            {"input_ids": torch.randint(0, 30, (6,), generator=g), "labels": torch.randint(0, 200, (6,), generator=g)}
            for _ in range(16)
        ]
        loader = DataLoader(items, batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(
        max_epochs=1, precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, loader, loader)
    for key in ("train/loss_epoch", "val/loss", "val/acc"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
