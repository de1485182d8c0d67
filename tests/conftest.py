import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels run on CPU tensors in its interpreter (tests/test_triton_kernel.py).
# It must be set before triton is first imported: the language functions are built at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
