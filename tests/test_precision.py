"""Mixed precision on CPU: half logits keep the loss, the mask decision and the metric sound."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyClassifier, blobs, loader, trainer

from lightning_assoftmax.functional import as_softmax_loss_and_stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_match_float32_within_tolerance(dtype):
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=4)
    x, y = blobs(512).tensors
    with torch.no_grad():
        logits32 = model(x) * 3
    loss32, masked32, count = as_softmax_loss_and_stats(logits32, y, 0.1)
    loss16, masked16, _ = as_softmax_loss_and_stats(logits32.to(dtype), y, 0.1)
    assert loss16.dtype == torch.float32 and math.isfinite(loss16.item())
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2, abs=2e-3)
    # Rounding the logits to 8 (bf16) or 11 (fp16) mantissa bits may flip rows that sit on the
    # margin; that must stay rare.
    assert abs(masked16.item() - masked32.item()) <= 0.02 * count.item()


def test_bf16_mixed_training_matches_float32_run():
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        model = TinyClassifier(lr=0.1)
        t = trainer(max_epochs=4, precision=precision)
        data = blobs(128)
        t.fit(model, loader(data, shuffle=False), loader(data))
        results[precision] = {k: float(v) for k, v in t.callback_metrics.items()}
    full, half = results["32-true"], results["bf16-mixed"]
    for key in ("val/loss", "val/masked_ratio", "val/ce_loss", "val/acc", "train/loss_epoch"):
        assert math.isfinite(half[key]), key
    assert half["val/acc"] == pytest.approx(full["val/acc"], abs=0.05)
    assert half["val/masked_ratio"] == pytest.approx(full["val/masked_ratio"], abs=0.08)
    assert half["val/loss"] == pytest.approx(full["val/loss"], rel=0.2, abs=0.02)
