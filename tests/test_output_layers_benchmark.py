"""benchmarks/output_layers.py runs end to end (--quick) and its interleaved training is what it
claims: each configuration's run does not depend on the others (a replay alone gives the same
model), and the perplexity it reports is the exact one of the head's distribution."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import benchmark_module

CONFIGS = "dense,adaptive + AS,sampled"


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("output_layers")


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("output_layers")
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--quick", "--configs", CONFIGS, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return results, out


@pytest.mark.slow
def test_quick_run_writes_both_tables(quick_run):
    results, out = quick_run
    stored = json.loads((out / "results.json").read_text())
    assert [r["head"] for r in stored["layers"]] == [r["head"] for r in stored["training"]] == CONFIGS.split(",")
    for row in stored["layers"]:
        assert row["cpu_ms"] > 0 and row["speedup_cpu"] > 0 and math.isfinite(row["peak_mb"])
    dense = stored["layers"][0]
    assert dense["speedup_cpu"] == 1.0 and dense["peak_mb"] > 10  # 256 x 30522 float scores at least
    for row in stored["training"]:
        assert row["steps"] > 0 and 1 < row["ppl"] < 1e6 and 0 <= row["acc"] <= 1
    markdown = (out / "results.md").read_text()
    assert "| adaptive + AS |" in markdown and "ppl at" in markdown


@pytest.mark.slow
def test_interleaved_runs_are_independent_and_perplexity_is_exact(bench, quick_run):
    results, _ = quick_run
    args = bench.parse_args(["--quick"])
    torch.set_num_threads(1)
    data = bench.load_data(args)
    counts = data.class_counts
    config = next(c for c in bench.CONFIGS if c.label == "adaptive + AS")
    row = next(r for r in results["training"] if r["head"] == config.label)
    last = row["evals"][-1]

    # Alone, for the same number of steps: the same model as in the interleaved budget run.
    run = bench.Run(config, data, counts, args)
    torch.set_rng_state(run.rng)
    for _ in range(last["steps"]):
        run.step()
    val = data.datasets["val"]
    windows = [val[i] for i in range(args.val_windows)]
    batch = bench.PadCollate(data.pad_token_id)(windows)
    run.model.eval()
    with torch.no_grad():
        hidden = run.model.features(batch["input_ids"])
        log_p = run.model.output.log_prob(hidden)
    target = batch["labels"]
    valid = target != -100
    nll = F.nll_loss(log_p[valid], target[valid])
    assert math.exp(float(nll)) == pytest.approx(last["ppl"], rel=1e-4)
    assert float((log_p.argmax(-1) == target)[valid].float().mean()) == pytest.approx(last["acc"])
