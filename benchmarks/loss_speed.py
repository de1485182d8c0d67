"""Speed and memory of the AS-Softmax losses against the losses they replace, on CPU or CUDA.

Prints markdown tables of ratios against a baseline measured in the same run:

* **single-label**: ``as_softmax_cross_entropy`` against ``F.cross_entropy``, forward+backward;
* **multi-label**: ``multilabel_as_softmax_loss`` against ``F.binary_cross_entropy_with_logits``;
* **layouts**: token logits ``(N, L, C)`` passed as ``.transpose(1, 2)`` (the common case, no
  copy) and stored channel-second ``(N, C, L)`` (copied to rows);
* **models** (CPU): the share of the loss in one training step (forward, backward, AdamW step)
  of each ready-made model, from the step time with the loss and with a trivial loss
  (``logits.sum()``, which leaves the model's backward unchanged);
* **fused**: ``linear_as_softmax_cross_entropy`` (where this version has it) against
  ``F.linear`` + ``as_softmax_cross_entropy``: peak memory and time; on CUDA also against
  Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and cut-cross-entropy's
  ``linear_cross_entropy`` where they import.

Timing: each repeat runs every candidate once, in turn, and a ratio is the median over repeats of
the per-repeat ratio, so load from other processes hits both sides alike. On CPU every table is
measured once per ``--threads`` count (default: one thread and the machine's default, which is
what users run with), in wall-clock time (*time ratio*) and in process CPU time (*CPU-time
ratio*, ``time.process_time``: page faults and the CPU time of every thread included); on CUDA,
CUDA events around each call. The footer gives the load average before and after the run
(``os.getloadavg``): on a loaded machine two threads wait for each other at every parallel
region, which inflates both sides. Memory: on CPU, the bytes of the
distinct storages autograd saves for backward (``saved_tensors_hooks``) and, for the fused
section, the peak resident memory of a fresh process running one call; on CUDA, the peak of
``torch.cuda.max_memory_allocated`` above the inputs.

The logits are random with the target (or the positives) raised by a random margin, so a batch
mixes masked, partly masked and unmasked samples, as in training; ``masked`` is their share.

Usage::

    python benchmarks/loss_speed.py                    # CPU tables (docs/performance.md)
    python benchmarks/loss_speed.py --threads 2        # one thread count only
    python benchmarks/loss_speed.py --device cuda      # adds bfloat16, large vocabularies, Liger
    python benchmarks/loss_speed.py --quick            # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_assoftmax.functional import (
    as_softmax_cross_entropy,
    masked_sample_ratio,
    multilabel_as_softmax_loss,
    multilabel_masked_sample_ratio,
)

CPU_SHAPES = [(8192, 5), (4096, 150), (2048, 5000), (512, 32000)]
CUDA_SHAPES = CPU_SHAPES + [(8192, 32000), (8192, 128256)]
QUICK_SHAPES = [(64, 5), (32, 300)]

Fn = Callable[[], object]


# --------------------------------------------------------------------------- measuring


class Clock:
    """Times calls on one device (milliseconds): wall-clock and process CPU time on CPU, CUDA
    events on CUDA (reported as both)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Fn) -> tuple[float, float]:
        """``(wall ms, CPU ms)`` of one call of ``fn``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
            return elapsed, elapsed
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        return (time.perf_counter() - start_wall) * 1e3, (time.process_time() - start_cpu) * 1e3


class Times:
    """Per-repeat milliseconds of each candidate, wall-clock (``wall``) and CPU (``cpu``)."""

    def __init__(self, names) -> None:
        self.wall: dict[str, list[float]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in names}

    def __getitem__(self, name: str) -> list[float]:
        return self.wall[name]


def time_interleaved(clock: Clock, fns: dict[str, Fn], repeats: int) -> Times:
    """Per-repeat milliseconds of each function; every repeat runs all of them, in turn."""
    for fn in fns.values():  # warm-up: allocator, lazy initialisation, kernel caches
        fn()
        fn()
    clock.sync()
    times = Times(fns)
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = clock.time(fn)
            times.wall[name].append(wall)
            times.cpu[name].append(cpu)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of the per-repeat ratio (pairs are adjacent in time, so drift cancels)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def saved_bytes(fn: Fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def cuda_peak_bytes(fn: Fn) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> Fn:
    def run() -> None:
        leaf.grad = None
        loss_fn(leaf).backward()

    return run


def repeats_for(numel: int, quick: bool, device: str) -> int:
    if quick:
        return 2
    if device == "cuda":
        return 30
    return 41 if numel <= 1 << 20 else 11


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- data


def single_label_batch(n: int, c: int, dtype, device, seed: int):
    """Logits ``(n, c)`` drawn on ``device`` (no host-side work at large shapes) with a target
    score raised by a random margin, so that a batch mixes masked and unmasked rows."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, device=device)
    target = torch.randint(0, c, (n,), generator=generator, device=device)
    scale = 2.0 * (math.log(c) + 3.0)
    logits[torch.arange(n, device=device), target] += torch.rand(n, generator=generator, device=device) * scale
    return logits.to(dtype), target


def multi_label_batch(n: int, c: int, dtype, device, seed: int):
    """Logits ``(n, c)`` and 0/1 targets with 0 to 3 positives per row (fewer where drawn twice)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, device=device)
    positives = max(1, min(3, c // 3))
    columns = torch.randint(0, c, (n, positives), generator=generator, device=device)
    count = torch.randint(0, positives + 1, (n, 1), generator=generator, device=device)
    chosen = (torch.arange(positives, device=device) < count).float()
    target = torch.zeros(n, c, device=device).scatter_(1, columns, chosen)
    margin = torch.rand(n, 1, generator=generator, device=device) * 2.0 * (math.log(c) + 3.0)
    logits = logits + target * margin - (1 - target) * 0.5 * margin
    return logits.to(dtype), target


# --------------------------------------------------------------------------- loss tables


def torch_implementation(fn, *args):
    """``fn(*args)`` with the single-label op on its plain torch code (no Triton kernel)."""
    from lightning_assoftmax.ops import single_label

    choose = single_label.forward_rows_implementation
    single_label.forward_rows_implementation = lambda logits: single_label.as_softmax_forward_rows
    try:
        return fn(*args)
    finally:
        single_label.forward_rows_implementation = choose


def compare(
    clock: Clock,
    name: str,
    shape: str,
    dtype: torch.dtype,
    base: str,
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    logits: torch.Tensor,
    repeats: int,
    masked: float,
) -> dict:
    """One table row: ``candidates[name]`` against ``candidates[base]`` on ``logits``."""
    leaf = logits.detach().clone().requires_grad_()
    runs = {key: fwd_bwd(fn, leaf) for key, fn in candidates.items()}
    times = time_interleaved(clock, runs, repeats)
    row = {
        "loss": name,
        "logits": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "baseline": base,
        "time ratio": fmt(paired_ratio(times[name], times[base])),
    }
    if not clock.cuda:
        row["CPU-time ratio"] = fmt(paired_ratio(times.cpu[name], times.cpu[base]))
    saved = {key: saved_bytes(lambda fn=fn: fn(leaf)) for key, fn in candidates.items()}
    row["saved-bytes ratio"] = fmt(saved[name] / saved[base], 3)
    if clock.cuda:
        peak = {key: cuda_peak_bytes(run) for key, run in runs.items()}
        row["peak-memory ratio"] = fmt(peak[name] / peak[base], 3)
    row["masked"] = fmt(masked)
    row["loss ms"] = fmt(statistics.median(times[name]), 3)
    row["baseline ms"] = fmt(statistics.median(times[base]), 3)
    return row


def loss_tables(args, clock: Clock, shapes, dtypes) -> tuple[list[dict], list[dict]]:
    single, multi = [], []
    for n, c in shapes:
        repeats = repeats_for(n * c, args.quick, args.device)
        for dtype in dtypes:
            logits, target = single_label_batch(n, c, dtype, args.device, seed=n + c)
            masked = float(masked_sample_ratio(logits, target, args.delta))
            candidates = {
                "cross_entropy": lambda z, t=target: F.cross_entropy(z, t),
                "as_softmax_cross_entropy": lambda z, t=target: as_softmax_cross_entropy(
                    z, t, args.delta
                ),
            }
            single.append(
                compare(clock, "as_softmax_cross_entropy", f"{n} x {c}", dtype, "cross_entropy",
                        candidates, logits, repeats, masked)
            )
            if args.device == "cuda":  # the plain torch implementation on the same device
                torch_ops = {
                    "cross_entropy": candidates["cross_entropy"],
                    "as_softmax_cross_entropy (torch ops)": lambda z, t=target: torch_implementation(
                        as_softmax_cross_entropy, z, t, args.delta
                    ),
                }
                single.append(
                    compare(clock, "as_softmax_cross_entropy (torch ops)", f"{n} x {c}", dtype,
                            "cross_entropy", torch_ops, logits, repeats, masked)
                )
            del logits, target
            logits, target = multi_label_batch(n, c, dtype, args.device, seed=n + c + 1)
            masked = float(multilabel_masked_sample_ratio(logits, target, args.delta))
            candidates = {
                "bce_with_logits": lambda z, t=target: F.binary_cross_entropy_with_logits(
                    z, t.to(z.dtype)
                ),
                "multilabel_as_softmax_loss": lambda z, t=target: multilabel_as_softmax_loss(
                    z, t, args.delta
                ),
            }
            multi.append(
                compare(clock, "multilabel_as_softmax_loss", f"{n} x {c}", dtype,
                        "bce_with_logits", candidates, logits, repeats, masked)
            )
            del logits, target
    return single, multi


def layout_table(args, clock: Clock) -> list[dict]:
    """Token logits: ``(N, L, C)`` viewed as ``(N, C, L)``, and stored channel-second."""
    n, c, length = (2, 300, 16) if args.quick else (4, 30522, 128)
    rows = []
    for name, token_major in (("(N, L, C).transpose(1, 2)", True), ("(N, C, L) stored", False)):
        logits, target = single_label_batch(n * length, c, torch.float32, args.device, seed=1)
        logits = logits.view(n, length, c)
        logits = logits.contiguous() if token_major else logits.transpose(1, 2).contiguous()
        target = target.view(n, length)

        def view(z: torch.Tensor, token_major: bool = token_major) -> torch.Tensor:
            return z.transpose(1, 2) if token_major else z

        candidates = {
            "cross_entropy": lambda z, v=view, t=target: F.cross_entropy(v(z), t),
            "as_softmax_cross_entropy": lambda z, v=view, t=target: as_softmax_cross_entropy(
                v(z), t, args.delta
            ),
        }
        masked = float(masked_sample_ratio(view(logits), target, args.delta))
        rows.append(
            compare(clock, "as_softmax_cross_entropy", f"{name}, N={n} C={c} L={length}",
                    torch.float32, "cross_entropy", candidates, logits, 2 if args.quick else 7,
                    masked)
        )
    return rows


# --------------------------------------------------------------------------- training steps


def ready_made_models(quick: bool) -> list[tuple[str, torch.nn.Module, tuple, torch.Tensor, bool]]:
    """``(description, model, inputs, target, token_logits)`` for each ready-made model, at the
    sizes of ``examples/*.yaml`` (tiny with ``quick``)."""
    from lightning_assoftmax.models import ImageClassifier, TextClassifier, TokenClassifier

    generator = torch.Generator().manual_seed(2)
    models = []
    # ImageClassifier on scikit-learn's digits (examples/digits.yaml): batch 64 of 8x8 images.
    from sklearn.datasets import load_digits

    digits = load_digits()
    batch = 8 if quick else 64
    images = torch.tensor(digits.images[:batch], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target[:batch])
    models.append(
        (f"ImageClassifier, digits, batch {batch}", ImageClassifier(num_classes=10, channels=32),
         (images,), labels, False)
    )
    # TextClassifier bag model (examples/bbc_news.yaml): 32 documents of 512 WordPiece ids,
    # a 384-wide table (MiniLM's width; random here), 5 classes. Random ids: the step's cost
    # does not depend on which tokens they are.
    vocab = 30522
    docs, length = (4, 32) if quick else (32, 512)
    text = TextClassifier(num_classes=5, vocab_size=vocab, embeddings=None, embed_dim=384)
    ids = torch.randint(0, vocab, (docs, length), generator=generator)
    models.append(
        (f"TextClassifier (bag), {docs} x {length} tokens", text, (ids,),
         torch.randint(0, 5, (docs,), generator=generator), False)
    )
    # TokenClassifier, next-token prediction over BBC News (examples/bbc_tokens.yaml): batch 16 of
    # 32 tokens, 30522 classes; padding targets (-100) as the datamodule makes them.
    seqs, length = (2, 8) if quick else (16, 32)
    classes = 300 if quick else vocab
    token = TokenClassifier(num_classes=classes, vocab_size=vocab, embed_dim=64, hidden_dim=128)
    ids = torch.randint(0, vocab, (seqs, length), generator=generator)
    target = torch.randint(0, classes, (seqs, length), generator=generator)
    target[:, -length // 8 :] = -100
    models.append(
        (f"TokenClassifier, {seqs} x {length} tokens, {classes} classes", token, (ids,), target,
         True)
    )
    return models


def model_table(args, clock: Clock) -> list[dict]:
    """The loss's share of a training step: (step with the loss - step with ``logits.sum()``)
    / step with the loss, per repeat, then the median."""
    rows = []
    for description, model, inputs, target, token_logits in ready_made_models(args.quick):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "trivial": lambda z, t: z.sum(),
            "cross_entropy": lambda z, t: F.cross_entropy(z, t),
            "as_softmax": lambda z, t: as_softmax_cross_entropy(z, t, args.delta),
        }

        def step(loss_fn, model=model, optimizer=optimizer, inputs=inputs, target=target,
                 token_logits=token_logits) -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(*inputs)
            if token_logits:  # (N, L, C) -> (N, C, L), as TokenClassifier passes them
                logits = logits.transpose(1, 2)
            loss_fn(logits, target).backward()
            optimizer.step()

        runs = {name: (lambda fn=fn: step(fn)) for name, fn in losses.items()}
        repeats = 2 if args.quick else 15
        times = time_interleaved(clock, runs, repeats)

        def share(name: str, times=times) -> float:
            # CPU time: a difference of two step times, so preemption by other processes (which
            # wall-clock time would count) must not enter it.
            return statistics.median(
                (a - b) / a for a, b in zip(times.cpu[name], times.cpu["trivial"], strict=True)
            )

        with torch.no_grad():
            logits = model(*inputs)
        rows.append({
            "model, batch": description,
            "logits": " x ".join(str(v) for v in logits.shape),
            "step CPU ms (trivial loss)": fmt(statistics.median(times.cpu["trivial"]), 1),
            "as_softmax share": f"{100 * share('as_softmax'):.1f}%",
            "cross_entropy share": f"{100 * share('cross_entropy'):.1f}%",
        })
    return rows


# --------------------------------------------------------------------------- fused output layer


def fused_loss():
    """``linear_as_softmax_cross_entropy`` where this version of the package has it, else None."""
    try:
        from lightning_assoftmax.functional import linear_as_softmax_cross_entropy
    except ImportError:
        return None
    return linear_as_softmax_cross_entropy


def fused_candidates(device: str, delta: float) -> dict[str, Callable]:
    """``name -> fn(hidden, weight, target)`` returning the loss, for the fused section."""
    candidates: dict[str, Callable] = {
        "F.linear + as_softmax_cross_entropy": lambda h, w, t: as_softmax_cross_entropy(
            F.linear(h, w).float(), t, delta
        ),
    }
    fused = fused_loss()
    if fused is not None:
        candidates["linear_as_softmax_cross_entropy"] = lambda h, w, t: fused(
            h, w, t, delta=delta
        )
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            candidates["liger LigerFusedLinearCrossEntropyLoss"] = lambda h, w, t: liger(w, h, t)
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            candidates["cut_cross_entropy linear_cross_entropy"] = (
                lambda h, w, t: linear_cross_entropy(h, w, t)
            )
        except ImportError:
            pass
        candidates["F.linear + F.cross_entropy"] = lambda h, w, t: F.cross_entropy(
            F.linear(h, w).float(), t
        )
    return candidates


def fused_inputs(n: int, d: int, v: int, dtype, device: str):
    generator = torch.Generator(device=device).manual_seed(3)
    hidden = torch.randn(n, d, generator=generator, device=device) / d**0.5
    weight = torch.randn(v, d, generator=generator, device=device)
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    # Raise the target's score so that the batch mixes masked and unmasked tokens.
    weight[target[: n // 2]] += 2.0 * hidden[: n // 2]
    return (
        hidden.to(device=device, dtype=dtype).requires_grad_(),
        weight.to(device=device, dtype=dtype).requires_grad_(),
        target.to(device),
    )


def _fused_peak_child(name: str, n: int, d: int, v: int, delta: float) -> None:
    """Child process of :func:`cpu_peak_rss`: one forward+backward (or nothing for "inputs"),
    then prints the process's peak resident set (``VmHWM``, kB)."""
    hidden, weight, target = fused_inputs(n, d, v, torch.float32, "cpu")
    if name != "inputs":
        fused_candidates("cpu", delta)[name](hidden, weight, target).backward()
    with open("/proc/self/status") as status:
        print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


def cpu_peak_rss(name: str, n: int, d: int, v: int, delta: float) -> int:
    """Peak resident bytes of a fresh process that builds the inputs and runs ``name`` once.

    Read by the child from its own ``/proc/self/status``: the ``ru_maxrss`` that ``wait4`` returns
    would include the parent's resident set at the fork.
    """
    code = (
        "import sys; sys.path[:0] = sys.argv[1:3]; import loss_speed; "
        f"loss_speed._fused_peak_child({name!r}, {n}, {d}, {v}, {delta})"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    result = subprocess.run(
        [sys.executable, "-c", code, here, root], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"the peak-memory run of {name!r} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.split()[-1]) * 1024


def fused_table(args, clock: Clock) -> list[dict] | None:
    """Peak memory and time of the fused output layer + loss against the unfused pair."""
    if fused_loss() is None and args.device == "cpu":
        return None
    if args.device == "cuda":
        n, d, v, dtype = (256, 64, 1000, torch.bfloat16) if args.quick else (
            8192, 4096, 128256, torch.bfloat16)
    else:
        n, d, v, dtype = (64, 16, 300, torch.float32) if args.quick else (
            8192, 1024, 32000, torch.float32)
    base = "F.linear + as_softmax_cross_entropy"
    candidates = fused_candidates(args.device, args.delta)
    hidden, weight, target = fused_inputs(n, d, v, dtype, args.device)

    def run(fn) -> Fn:
        def call() -> None:
            hidden.grad = weight.grad = None
            fn(hidden, weight, target).backward()

        return call

    runs = {name: run(fn) for name, fn in candidates.items()}
    times = time_interleaved(clock, runs, 2 if args.quick else (20 if clock.cuda else 3))
    if clock.cuda:
        peak = {name: cuda_peak_bytes(fn) for name, fn in runs.items()}
    else:
        inputs = cpu_peak_rss("inputs", n, d, v, args.delta)
        peak = {name: cpu_peak_rss(name, n, d, v, args.delta) - inputs for name in runs}
    # The peers' fused layers, where present, are the reference for the fused loss's figures.
    peers = [name for name in runs if name.startswith(("liger", "cut_cross_entropy"))]
    rows = []
    for name in runs:
        row = {
            "implementation": name,
            "N x d -> V": f"{n} x {d} -> {v}",
            "dtype": str(dtype).replace("torch.", ""),
            "time ratio": fmt(paired_ratio(times[name], times[base])),
            "peak-memory ratio": fmt(peak[name] / max(peak[base], 1), 3),
        }
        for peer in peers:
            short = peer.split()[0]
            row[f"time vs {short}"] = fmt(paired_ratio(times[name], times[peer]))
            row[f"peak vs {short}"] = fmt(peak[name] / max(peak[peer], 1), 3)
        row["peak MiB"] = fmt(peak[name] / 2**20, 0)
        row["ms"] = fmt(statistics.median(times[name]), 1)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke run)")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated CPU intra-op thread counts, one set of tables each, in this order "
        f"(default: the machine's default, here {torch.get_num_threads()}, then 1)",
    )
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--shapes", help="comma-separated NxC list, e.g. 2048x5000,512x32000")
    parser.add_argument(
        "--sections",
        default="loss,layouts,models,fused",
        help="comma-separated subset of loss,layouts,models,fused (default: all)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    default_threads = torch.get_num_threads()
    if args.threads is None:
        # The machine's default count first: measured after a one-thread pass in the same process,
        # F.cross_entropy at 4096 x 150 read 0.5 ms instead of the 2.5 ms that a fresh process
        # (what a user runs) takes, so the second table's ratios came out 1.7-2.1x instead of
        # about 1.2x on a quiet 2-core machine.
        threads = sorted({1, default_threads}, reverse=True)
    else:
        try:
            threads = [int(v) for v in args.threads.split(",")]
        except ValueError:
            parser.error(f"--threads takes comma-separated integers, got {args.threads!r}")
        if any(v < 1 for v in threads):
            parser.error(f"--threads takes counts of at least 1, got {args.threads!r}")
    if args.device == "cuda":
        threads = threads[-1:]  # the host's threads barely matter to CUDA kernels
    clock = Clock(args.device)
    sections = set(args.sections.split(","))
    if args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    dtypes = [torch.float32, torch.bfloat16] if args.device == "cuda" else [torch.float32]
    start = time.perf_counter()
    load_before = os.getloadavg()
    out: list[str] = []

    def emit(title: str, rows: list[dict] | None, note: str = "") -> None:
        if rows is None:
            text = f"## {title}\n\n{note}"
        else:
            text = f"## {title}\n\n{format_table(rows)}"
        print(text + "\n", flush=True)
        out.append(text)

    for count in threads:
        torch.set_num_threads(count)
        where = (
            torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU, {count} thread{'s' if count > 1 else ''}"
        )
        if "loss" in sections:
            single, multi = loss_tables(args, clock, shapes, dtypes)
            emit(f"Single-label, against F.cross_entropy (forward+backward; {where})", single)
            emit(
                f"Multi-label, against F.binary_cross_entropy_with_logits (forward+backward; {where})",
                multi,
            )
        if "layouts" in sections:
            emit(f"Token logits layouts, against F.cross_entropy ({where})", layout_table(args, clock))
        if "models" in sections and args.device == "cpu":
            emit(
                f"Share of the loss in a training step of each ready-made model ({where})",
                model_table(args, clock),
            )
        if "fused" in sections:
            emit(
                f"Fused output layer and loss ({where})",
                fused_table(args, clock),
                "skipped: lightning_assoftmax.functional has no linear_as_softmax_cross_entropy.",
            )
    torch.set_num_threads(default_threads)
    load_after = os.getloadavg()
    footer = (
        f"torch {torch.__version__}, delta={args.delta}, {os.cpu_count()} CPU cores; medians of "
        f"paired per-repeat ratios; load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.2f}' for v in load_before)} before and "
        f"{', '.join(f'{v:.2f}' for v in load_after)} after; "
        f"{time.perf_counter() - start:.0f} s."
    )
    print(footer)
    out.append(footer)
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
