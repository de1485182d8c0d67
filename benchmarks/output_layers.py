"""Output layers for 30522 classes: next-token prediction on BBC News (``BBCNewsTokens``), on CPU.

Every head of ``lightning_assoftmax.heads`` against the full softmax (``dense``) measured in the
same run, with AS-Softmax (delta 0.1) where it applies. Classes are WordPiece ids; their counts in
the training split (a Zipf-like stream) feed the frequency-based heads.

1. **Layer** (``--part layers``): forward+backward of the output layer alone on one batch of 4096
   hidden states of width 256 (standard normal) with the targets of a training batch. Each repeat
   runs every head once, in turn; the speed-up is the median over repeats of ``dense`` time / head
   time in the same repeat, in CPU time of the process and in wall-clock time. Peak memory is the
   rise of the resident set during one step (``VmHWM`` after resetting it), measured in a child
   process with ``MALLOC_MMAP_THRESHOLD_`` fixed so that every large tensor is mapped and unmapped
   (glibc would otherwise keep freed memory and hide later peaks); parameter gradients included.
2. **Training** (``--part training``): ``TokenClassifier`` (embeddings 128, GRU 256) trained with
   each head on batches of 64 windows of 64 tokens in the same order, for the same time budget per
   configuration. The configurations run interleaved in slices (each with its own random state, so
   interleaving changes nothing it computes) so that the machine's load hits them alike. Every
   ``budget / evals`` seconds of training, exact validation perplexity (``exp`` of the mean
   negative log-likelihood of the head's full normalised distribution) and next-token accuracy are
   measured on the first ``--val-windows`` validation windows (not counted as training time). The
   table gives each head's final values, its values after as many steps as ``dense`` made in its
   budget (a deterministic replay), and the training time it needed to reach ``dense``'s final
   perplexity (the first evaluation at or below it).

The budget is counted in CPU seconds of the process by default (``--clock cpu``): on a machine
shared with other work the wall-clock time of a step varies with the load, while its CPU time
does not; with one thread (``--threads 1``, the default) a CPU second is a wall-clock second on
an idle core. ``--clock wall`` counts wall-clock time instead.

    python benchmarks/output_layers.py                          # both parts, budget 240 s per head
    python benchmarks/output_layers.py --part layers --repeats 7
    python benchmarks/output_layers.py --part training --budget 600 --out runs/output_layers
    python benchmarks/output_layers.py --quick                  # tiny settings, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_assoftmax.data import BBCNewsTokens
from lightning_assoftmax.data._text import PadCollate
from lightning_assoftmax.heads import build_head
from lightning_assoftmax.models import TokenClassifier

DELTA = 0.1
HIDDEN = 256
EMBED = 128


@dataclass(frozen=True)
class Config:
    label: str
    head: str
    loss: str = "softmax"  # "as_softmax": AS-Softmax with DELTA
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> float | None:
        return DELTA if self.loss == "as_softmax" else None


SAMPLES = 1024
CONFIGS = [
    Config("dense", "dense"),
    Config("dense + AS", "dense", "as_softmax"),
    Config("adaptive", "adaptive"),
    Config("adaptive + AS", "adaptive", "as_softmax"),
    Config("class_based", "class_based"),
    Config("class_based + AS", "class_based", "as_softmax"),
    Config("hierarchical", "hierarchical"),
    Config("hierarchical + AS", "hierarchical", "as_softmax"),
    Config("sampled", "sampled", kwargs={"num_samples": SAMPLES}),
    Config("sampled + AS", "sampled", "as_softmax", kwargs={"num_samples": SAMPLES}),
    Config("nce", "nce", kwargs={"num_samples": SAMPLES}),
    Config("negative_sampling", "nce", kwargs={"objective": "negative_sampling", "num_samples": SAMPLES}),
]
BASELINE = "dense"


def head_kwargs(config: Config, counts: list[int] | None) -> dict[str, Any]:
    kwargs = dict(config.kwargs)
    if counts is not None and config.head != "dense":
        kwargs["class_counts"] = counts
    return kwargs


# -- data ------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace) -> BBCNewsTokens:
    data = BBCNewsTokens(
        batch_size=args.batch_windows, seq_len=args.seq_len,
        max_windows_per_article=2 if args.quick else None,
    )
    data.setup("fit")
    return data


def train_batches(data: BBCNewsTokens, seed: int):
    """Training batches in one fixed shuffled order, endlessly (every configuration sees the same)."""
    epoch = 0
    while True:
        loader = DataLoader(
            data.datasets["train"], batch_size=data.batch_size, shuffle=True, drop_last=True,
            collate_fn=PadCollate(data.pad_token_id), generator=torch.Generator().manual_seed(seed + epoch),
        )
        yield from loader
        epoch += 1


# -- part 1: the layer alone -----------------------------------------------------------------------
def layer_inputs(data: BBCNewsTokens, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = train_batches(data, seed)
    targets: list[torch.Tensor] = []
    while sum(len(t) for t in targets) < tokens:
        labels = next(batches)["labels"].reshape(-1)
        targets.append(labels[labels != -100])
    target = torch.cat(targets)[:tokens]
    hidden = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return hidden, target


def build_layers(num_classes: int, counts: list[int], configs: list[Config]) -> dict[str, torch.nn.Module]:
    layers = {}
    for config in configs:
        torch.manual_seed(0)
        layers[config.label] = build_head(config.head, HIDDEN, num_classes, **head_kwargs(config, counts))
    return layers


def layer_step(layer: torch.nn.Module, config: Config, hidden: torch.Tensor, target: torch.Tensor) -> None:
    hidden = hidden.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    layer.loss(hidden, target, delta=config.delta).backward()


def layer_times(args, layers, configs, hidden, target) -> dict[str, dict[str, list[float]]]:
    for config in configs:  # warm-up: allocator, lazy initialisation
        layer_step(layers[config.label], config, hidden, target)
    samples = {c.label: {"cpu": [], "wall": []} for c in configs}
    for _ in range(args.repeats):
        for config in configs:
            cpu, wall = time.process_time(), time.perf_counter()
            layer_step(layers[config.label], config, hidden, target)
            samples[config.label]["cpu"].append(time.process_time() - cpu)
            samples[config.label]["wall"].append(time.perf_counter() - wall)
    return samples


def _memory_kb(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", status).group(1))


def layer_peaks(layers, configs, hidden, target) -> dict[str, float]:
    """Rise of the resident set (MB) during one forward+backward of each layer."""
    peaks = {}
    for config in configs:
        layer_step(layers[config.label], config, hidden, target)  # warm-up
        layers[config.label].zero_grad(set_to_none=True)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = _memory_kb("VmRSS")
        layer_step(layers[config.label], config, hidden, target)
        peaks[config.label] = (_memory_kb("VmHWM") - before) / 1024
    return peaks


def measure_peaks_in_child(args, hidden, target, num_classes, counts, configs) -> dict[str, float] | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "inputs.pt")
        torch.save({"hidden": hidden, "target": target, "num_classes": num_classes, "counts": counts}, path)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        command = [sys.executable, __file__, "--memory-probe", str(path), "--threads", str(args.threads),
                   "--configs", ",".join(c.label for c in configs)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"memory probe failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_probe(path: str, labels: list[str]) -> None:
    inputs = torch.load(path, weights_only=False)
    configs = [c for c in CONFIGS if c.label in labels]
    layers = build_layers(inputs["num_classes"], inputs["counts"], configs)
    print(json.dumps(layer_peaks(layers, configs, inputs["hidden"], inputs["target"])))


def paired_ratio(baseline: list[float], other: list[float]) -> float:
    """Median over repeats of baseline / other in the same repeat (adjacent in time)."""
    return statistics.median(b / o for b, o in zip(baseline, other, strict=True))


def layer_part(args, data, counts, configs) -> list[dict]:
    hidden, target = layer_inputs(data, args.tokens, args.seed)
    layers = build_layers(data.num_classes, counts, configs)
    times = layer_times(args, layers, configs, hidden, target)
    peaks = measure_peaks_in_child(args, hidden, target, data.num_classes, counts, configs) or {}
    base = times[BASELINE]
    rows = []
    for config in configs:
        t = times[config.label]
        rows.append({
            "head": config.label,
            "cpu_ms": 1000 * statistics.median(t["cpu"]),
            "wall_ms": 1000 * statistics.median(t["wall"]),
            "speedup_cpu": paired_ratio(base["cpu"], t["cpu"]),
            "speedup_wall": paired_ratio(base["wall"], t["wall"]),
            "peak_mb": peaks.get(config.label, math.nan),
        })
    return rows


# -- part 2: training for a time budget --------------------------------------------------------------
class Run:
    """One configuration's model, optimizer, batch stream and random state."""

    def __init__(self, config: Config, data: BBCNewsTokens, counts: list[int], args) -> None:
        self.config = config
        torch.manual_seed(args.seed)
        self.model = TokenClassifier(
            num_classes=data.num_classes, vocab_size=data.vocab_size, embed_dim=EMBED, hidden_dim=HIDDEN,
            dropout=0.1, lr=args.lr, delta=DELTA, loss=config.loss, head=config.head,
            head_kwargs=config.kwargs or None, class_counts=counts,
        )
        self.optimizer = self.model.configure_optimizers()
        self.batches = train_batches(data, args.seed)
        self.rng = torch.get_rng_state()
        self.steps = 0
        self.cpu = 0.0
        self.wall = 0.0
        self.masked = 0
        self.valid = 0
        self.evals: list[dict] = []

    def step(self) -> None:
        batch = next(self.batches)
        cpu, wall = time.process_time(), time.perf_counter()
        self.model.train()
        loss = self.model.training_step(batch, self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall
        self.steps += 1
        masked, valid = self.model.as_softmax_last_stats or (0, 0)
        self.masked += int(masked)
        self.valid += int(valid)


@torch.no_grad()
def evaluate(model: TokenClassifier, val_batches: list[dict]) -> tuple[float, float]:
    """Exact perplexity and accuracy of the model's full distribution on the validation windows."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for batch in val_batches:
        log_p = model(batch["input_ids"]).flatten(0, 1)
        target = batch["labels"].reshape(-1)
        valid = target != -100
        nll += float(-log_p[valid].gather(1, target[valid, None]).sum())
        correct += int((log_p.argmax(1) == target)[valid].sum())
        count += int(valid.sum())
    return math.exp(nll / count), correct / count


def run_for(run: Run, seconds: float, budget: float, args, val_batches) -> None:
    """Train ``run`` for a slice of ``seconds`` (its clock), evaluating at each eval point passed."""
    torch.set_rng_state(run.rng)
    clock = (lambda: run.cpu) if args.clock == "cpu" else (lambda: run.wall)
    stop = min(budget, clock() + seconds)
    interval = budget / args.evals
    while clock() < stop:
        run.step()
        if clock() >= interval * (len(run.evals) + 1) or clock() >= budget:
            state = torch.get_rng_state()
            ppl, acc = evaluate(run.model, val_batches)
            torch.set_rng_state(state)
            run.evals.append({"steps": run.steps, "cpu": run.cpu, "wall": run.wall, "ppl": ppl, "acc": acc})
    run.rng = torch.get_rng_state()


def replay(config: Config, data, counts, args, steps: int, val_batches) -> tuple[float, float]:
    """The same run as in the budget (same seed and batches), stopped after ``steps`` steps."""
    run = Run(config, data, counts, args)
    torch.set_rng_state(run.rng)
    for _ in range(steps):
        run.step()
    return evaluate(run.model, val_batches)


def training_part(args, data, counts, configs) -> list[dict]:
    val = data.datasets["val"]
    windows = [val[i] for i in range(min(args.val_windows, len(val)))]
    collate = PadCollate(data.pad_token_id)
    val_batches = [collate(windows[i : i + 16]) for i in range(0, len(windows), 16)]
    runs = [Run(config, data, counts, args) for config in configs]
    budget = args.budget
    clock = (lambda r: r.cpu) if args.clock == "cpu" else (lambda r: r.wall)
    while any(clock(r) < budget for r in runs):
        for run in runs:
            if clock(run) < budget:
                run_for(run, args.slice, budget, args, val_batches)
        done = ", ".join(f"{r.config.label} {r.steps}" for r in runs)
        print(f"  steps so far: {done}", flush=True)
        if args.out:  # progress survives an interrupted run
            progress = {r.config.label: r.evals for r in runs}
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "training_progress.json").write_text(json.dumps(progress, indent=1))

    base = next(r for r in runs if r.config.label == BASELINE)
    base_ppl = base.evals[-1]["ppl"]
    rows = []
    for run in runs:
        final = run.evals[-1]
        same = next((e for e in run.evals if e["steps"] == base.steps), None)
        if same is None:
            same_ppl, same_acc = replay(run.config, data, counts, args, base.steps, val_batches)
        else:
            same_ppl, same_acc = same["ppl"], same["acc"]
        reached = next((e for e in run.evals if e["ppl"] <= base_ppl), None)
        rows.append({
            "head": run.config.label,
            "steps": run.steps,
            "step_cpu_s": run.cpu / run.steps,
            "step_wall_s": run.wall / run.steps,
            "ppl": final["ppl"],
            "acc": final["acc"],
            "ppl_at_dense_steps": same_ppl,
            "acc_at_dense_steps": same_acc,
            "ppl_ratio_at_dense_steps": same_ppl / base_ppl_at(base, base.steps),
            "time_to_dense_ppl": None if reached is None else reached[args.clock],
            "masked_ratio": run.masked / run.valid if run.valid else 0.0,
            "evals": run.evals,
        })
    return rows


def base_ppl_at(base: Run, steps: int) -> float:
    return next(e["ppl"] for e in base.evals if e["steps"] == steps)


# -- output ----------------------------------------------------------------------------------------
def print_layer_table(rows: list[dict], args) -> str:
    lines = [
        f"Output layer forward+backward, {args.tokens} tokens x hidden {HIDDEN} -> {args.num_classes} classes "
        f"(median of {args.repeats} repeats; speed-up = dense / head, paired per repeat)",
        "",
        "| head | CPU ms | wall ms | speed-up (CPU) | speed-up (wall) | peak MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['cpu_ms']:.0f} | {r['wall_ms']:.0f} | {r['speedup_cpu']:.1f}x | "
            f"{r['speedup_wall']:.1f}x | {r['peak_mb']:.0f} |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def print_training_table(rows: list[dict], args) -> str:
    base = next(r for r in rows if r["head"] == BASELINE)
    unit = "CPU s" if args.clock == "cpu" else "s"
    lines = [
        f"TokenClassifier trained for {args.budget:g} {unit} per head ({args.clock} clock, {args.threads} thread(s)); "
        f"exact validation perplexity / accuracy on {args.val_windows} windows; dense made {base['steps']} steps",
        "",
        f"| head | steps | {unit} / step | val ppl | val acc | ppl at {base['steps']} steps | vs dense | "
        f"{unit} to dense's ppl {base['ppl']:.1f} | masked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_step = r["step_cpu_s"] if args.clock == "cpu" else r["step_wall_s"]
        reached = "not reached" if r["time_to_dense_ppl"] is None else f"{r['time_to_dense_ppl']:.0f}"
        lines.append(
            f"| {r['head']} | {r['steps']} | {per_step:.2f} | {r['ppl']:.1f} | {100 * r['acc']:.1f}% | "
            f"{r['ppl_at_dense_steps']:.1f} | {r['ppl_ratio_at_dense_steps']:.2f}x | {reached} | "
            f"{100 * r['masked_ratio']:.1f}% |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["layers", "training", "both"], default="both")
    parser.add_argument("--configs", default=None, help="comma-separated labels (default: all)")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per configuration")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--slice", type=float, default=30.0, help="seconds per turn of the interleaving")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per budget")
    parser.add_argument("--val-windows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-windows", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.slice, args.evals, args.val_windows = 2.0, 1.0, 2, 8
        args.repeats, args.tokens, args.seq_len, args.batch_windows = 1, 256, 16, 8
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = args.configs.split(",") if args.configs else [c.label for c in CONFIGS]
    if args.memory_probe:
        memory_probe(args.memory_probe, labels)
        return {}
    unknown = sorted(set(labels) - {c.label for c in CONFIGS})
    if unknown or BASELINE not in labels:
        raise SystemExit(f"--configs: unknown {unknown} or missing {BASELINE!r}; known: {[c.label for c in CONFIGS]}")
    configs = [c for c in CONFIGS if c.label in labels]
    data = load_data(args)
    counts = data.class_counts
    args.num_classes = data.num_classes
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "memory_probe"}}
    texts = []
    if args.part in ("layers", "both"):
        results["layers"] = layer_part(args, data, counts, configs)
        texts.append(print_layer_table(results["layers"], args))
    if args.part in ("training", "both"):
        results["training"] = training_part(args, data, counts, configs)
        texts.append(print_training_table(results["training"], args))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text("\n\n".join(texts) + "\n")
    return results


if __name__ == "__main__":
    main()
