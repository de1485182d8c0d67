"""The examples run end to end and learn (real data: scikit-learn's bundled digits)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quickstart_trains_on_digits(capsys):
    final = _load("quickstart").main(["--epochs", "4", "--warmup", "0.2"])
    out = capsys.readouterr().out
    assert "epoch  3" in out and "val/masked_ratio" in out
    assert final["val/acc"] > 0.85
    assert 0.0 < final["val/masked_ratio"] < 1.0
    assert final["val/loss"] < final["val/ce_loss"]
