import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels run on CPU tensors in its interpreter (tests/test_triton_kernel.py).
# It must be set before triton is first imported: the language functions are built at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's on-disk caches do not key on a custom op's Python backward: a cache filled while
# lightning_assoftmax/ops held another backward would replay it. One cache folder per version of
# the ops' sources keeps the cache warm between runs of the same code and never stale.
_OPS = Path(__file__).resolve().parents[1] / "lightning_assoftmax" / "ops"
_OPS_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_OPS.glob("*.py")))).hexdigest()[:16]
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_lightning_assoftmax_{_OPS_HASH}")
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread: the tiny models gain nothing from more, and the test machine may be shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_isolated(tmp_path, tmp_path_factory, monkeypatch, one_thread):
    """``tmp_path``, the working directory for a CLI run: what it writes lands there, token ids
    are cached once per test session, one torch thread."""
    monkeypatch.chdir(tmp_path)
    # The CLI gets its arguments from the test, not from pytest's own command line.
    monkeypatch.setattr(sys, "argv", ["lightning-assoftmax"])
    monkeypatch.setenv("LIGHTNING_ASSOFTMAX_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
    return tmp_path
