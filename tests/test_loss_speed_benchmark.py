"""benchmarks/loss_speed.py, gpu_fits.py and gpu_check.sh: smoke runs of the scripts' CPU paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loss_speed():
    yield from benchmark_module("loss_speed")


def test_one_table_per_thread_count_with_wall_and_cpu_ratios(loss_speed):
    before = torch.get_num_threads()
    out = loss_speed.main(["--quick", "--sections", "loss", "--shapes", "16x5", "--threads", "1,2"])
    for threads in ("CPU, 1 thread)", "CPU, 2 threads)"):
        assert f"Single-label, against F.cross_entropy (forward+backward; {threads}" in out
    assert out.count("| time ratio | CPU-time ratio |") == 4  # single- and multi-label, per count
    assert "load average" in out.splitlines()[-1]
    assert torch.get_num_threads() == before  # the caller's setting is restored


@pytest.mark.parametrize("threads", ["0", "1,x"])
def test_bad_thread_counts_are_refused(loss_speed, threads, capsys):
    with pytest.raises(SystemExit):
        loss_speed.main(["--quick", "--threads", threads])
    assert "--threads" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the script's path without CUDA")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.slow
def test_gpu_check_without_cuda_skips_the_cuda_steps_with_a_message(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               GPU_CHECK_SITE=str(tmp_path / "site"))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "environment:" in summary and "no CUDA device here: skipping" in summary
    assert "torch" in (tmp_path / "out" / "env.log").read_text()
