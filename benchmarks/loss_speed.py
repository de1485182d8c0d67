"""Speed and memory of the AS-Softmax losses against the losses they replace.

For each logits shape and dtype, times forward+backward of the public loss functions and of
their baselines (``F.cross_entropy`` for the single-label loss; BCE-with-logits and
``multilabel_soft_margin_loss`` for the multi-label one; ``sparsemax``/``entmax15`` losses from the
``entmax`` package for context) and prints a markdown table of ratios to the baseline:

* time ratio: each repeat runs a loss and its baseline once, in turn; the ratio is the median
  over repeats of the per-repeat ratio (so load from other processes hits both sides alike), in
  CPU time of the process (page faults included) and in wall-clock time. Each baseline is paired
  with the loss on its own: a loss timed right after another one finds the caches in that one's
  state, which made the same loss up to 20% slower after ``multilabel_soft_margin_loss``;
* saved-bytes ratio: bytes of the distinct storages that autograd saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks``.

The logits are random with the target (or the positives) raised by a random margin, so a batch
mixes masked samples, partly masked ones and unmasked ones, as in training; the ``masked`` column
gives the share of masked samples at ``delta``.

Large tensors cost page faults on CPU: glibc hands blocks above its mmap threshold back to the
system when freed, so each new ``(N, C)`` tensor is faulted in again. ``F.cross_entropy`` allocates
three per forward+backward and the fused losses one, which is part of their advantage at large C.
To compare the arithmetic alone, keep freed memory in the heap::

    MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647 python benchmarks/loss_speed.py

Usage::

    python benchmarks/loss_speed.py            # the table of docs/performance.md (under 2 minutes)
    python benchmarks/loss_speed.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
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

SHAPES = [(8192, 5), (4096, 150), (2048, 5000), (512, 32000)]
QUICK_SHAPES = [(64, 5), (32, 300)]


def saved_bytes(loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``loss_fn()``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(storages.values())


def time_interleaved(
    fns: dict[str, Callable[[], None]], repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Per-repeat CPU and wall seconds of each function, the functions run in turn each repeat.

    CPU time (``time.process_time``: user + system time of this process, page faults included)
    is what a call costs; wall time also counts waiting for a core on a shared machine.
    """
    for fn in fns.values():  # warm-up: allocator, lazy initialisation
        fn()
    samples = {name: {"cpu": [], "wall": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            fn()
            samples[name]["cpu"].append(time.process_time() - start_cpu)
            samples[name]["wall"].append(time.perf_counter() - start_wall)
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of the per-repeat ratio (pairs are adjacent in time, so drift cancels)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def single_label_batch(n: int, c: int, dtype: torch.dtype, generator: torch.Generator):
    logits = torch.randn(n, c, generator=generator)
    target = torch.randint(0, c, (n,), generator=generator)
    margin = torch.rand(n, generator=generator) * 2.0 * (torch.log(torch.tensor(float(c))) + 3.0)
    logits[torch.arange(n), target] += margin
    return logits.to(dtype), target


def multi_label_batch(n: int, c: int, dtype: torch.dtype, generator: torch.Generator):
    logits = torch.randn(n, c, generator=generator)
    positives = max(1, min(3, c // 3))
    ranks = torch.rand(n, c, generator=generator).argsort(dim=1)
    count = torch.randint(0, positives + 1, (n, 1), generator=generator)
    target = (ranks < count).float()
    margin = torch.rand(n, 1, generator=generator) * 2.0 * (torch.log(torch.tensor(float(c))) + 3.0)
    logits = logits + target * margin - (1 - target) * 0.5 * margin
    return logits.to(dtype), target


def fwd_bwd(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor
) -> Callable[[], None]:
    def run() -> None:
        logits.grad = None
        loss_fn(logits).backward()

    return run


def measure(
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    logits: torch.Tensor,
    repeats: int,
) -> dict[str, tuple[dict[str, list[float]], int]]:
    leaf = logits.detach().clone().requires_grad_()
    times = time_interleaved({k: fwd_bwd(fn, leaf) for k, fn in candidates.items()}, repeats)
    return {k: (times[k], saved_bytes(lambda fn=fn: fn(leaf))) for k, fn in candidates.items()}


def repeats_for(n: int, c: int, quick: bool) -> int:
    if quick:
        return 2
    return 25 if n * c <= 1 << 20 else 9


def single_label_rows(
    n: int, c: int, dtype, delta: float, repeats: int, entmax, generator
) -> list[dict]:
    logits, target = single_label_batch(n, c, dtype, generator)
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "cross_entropy": lambda z: F.cross_entropy(z, target),
        "as_softmax_cross_entropy": lambda z: as_softmax_cross_entropy(z, target, delta),
    }
    result = measure(candidates, logits, repeats)
    masked = float(masked_sample_ratio(logits, target, delta))
    rows = [_row("as_softmax_cross_entropy", n, c, dtype, "cross_entropy", result, masked)]
    if entmax is not None and dtype == torch.float32:
        # Sorting makes these slow at large C: fewer repeats, context only.
        candidates = {
            "cross_entropy": candidates["cross_entropy"],
            "sparsemax_loss": lambda z: entmax.sparsemax_loss(z, target).mean(),
            "entmax15_loss": lambda z: entmax.entmax15_loss(z, target).mean(),
        }
        result = measure(candidates, logits, min(repeats, 3))
        rows += [
            _row(name, n, c, dtype, "cross_entropy", result, masked)
            for name in list(candidates)[1:]
        ]
    return rows


def multi_label_rows(n: int, c: int, dtype, delta: float, repeats: int, generator) -> list[dict]:
    logits, target = multi_label_batch(n, c, dtype, generator)
    baselines: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "bce_with_logits": lambda z: F.binary_cross_entropy_with_logits(z, target.to(z.dtype)),
        "multilabel_soft_margin": lambda z: F.multilabel_soft_margin_loss(z, target.to(z.dtype)),
    }
    masked = float(multilabel_masked_sample_ratio(logits, target, delta))
    rows = []
    for base, base_fn in baselines.items():
        # Each baseline in its own pair: a loss timed right after another one finds the caches
        # in that one's state (multilabel_soft_margin leaves them cold for whatever follows).
        candidates = {
            base: base_fn,
            "multilabel_as_softmax_loss": lambda z: multilabel_as_softmax_loss(z, target, delta),
        }
        result = measure(candidates, logits, repeats)
        rows.append(_row("multilabel_as_softmax_loss", n, c, dtype, base, result, masked))
    return rows


def layout_rows(delta: float, quick: bool, generator) -> list[dict]:
    """Token logits ``(N, C, L)``: stored channel-second, and ``(N, L, C)`` viewed transposed."""
    n, c, length = (2, 300, 16) if quick else (4, 30522, 128)
    rows = []
    for name, token_major in (("(N, C, L)", False), ("(N, L, C).transpose(1, 2)", True)):
        logits, target = single_label_batch(n * length, c, torch.float32, generator)
        logits = logits.view(n, length, c)
        logits = logits.contiguous() if token_major else logits.transpose(1, 2).contiguous()
        target = target.view(n, length)

        def view(z: torch.Tensor, token_major: bool = token_major) -> torch.Tensor:
            return z.transpose(1, 2) if token_major else z

        candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "cross_entropy": lambda z, v=view, t=target: F.cross_entropy(v(z), t),
            "as_softmax_cross_entropy": lambda z, v=view, t=target: as_softmax_cross_entropy(
                v(z), t, delta
            ),
        }
        result = measure(candidates, logits, 2 if quick else 3)
        masked = float(masked_sample_ratio(view(logits), target, delta))
        row = _row("as_softmax_cross_entropy", n, c, torch.float32, "cross_entropy", result, masked)
        row["logits (N x C)"] = f"{name}, N={n} C={c} L={length}"
        rows.append(row)
    return rows


def run(
    shapes: list[tuple[int, int]],
    dtypes: list[torch.dtype],
    delta: float,
    quick: bool,
    with_entmax: bool,
):
    generator = torch.Generator().manual_seed(0)
    entmax = None
    if with_entmax:
        try:
            import entmax
        except ImportError:  # the entmax rows are context only
            entmax = None
    rows: list[dict] = []
    for n, c in shapes:
        repeats = repeats_for(n, c, quick)
        for dtype in dtypes:
            rows += single_label_rows(n, c, dtype, delta, repeats, entmax, generator)
            rows += multi_label_rows(n, c, dtype, delta, repeats, generator)
    return rows


def _row(
    name: str, n: int, c: int, dtype: torch.dtype, base: str, result: dict, masked: float
) -> dict:
    times, saved = result[name]
    base_times, base_saved = result[base]
    return {
        "loss": name,
        "logits (N x C)": f"{n} x {c}",
        "dtype": str(dtype).replace("torch.", ""),
        "baseline": base,
        "time ratio (CPU)": f"{paired_ratio(times['cpu'], base_times['cpu']):.2f}",
        "time ratio (wall)": f"{paired_ratio(times['wall'], base_times['wall']):.2f}",
        "saved-bytes ratio": f"{saved / base_saved:.4f}",
        "masked": f"{masked:.2f}",
        "loss ms (CPU)": f"{statistics.median(times['cpu']) * 1e3:.2f}",
        "baseline ms (CPU)": f"{statistics.median(base_times['cpu']) * 1e3:.2f}",
    }


def format_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[k] for k in header) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and 2 repeats (a smoke run)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--no-bf16", action="store_true", help="float32 only")
    parser.add_argument("--shapes", help="comma-separated NxC list, e.g. 2048x5000,512x32000")
    parser.add_argument(
        "--layouts",
        action="store_true",
        help="add token logits (N, C, L): channel-second, and (N, L, C) viewed transposed",
    )
    parser.add_argument("--no-entmax", action="store_true", help="skip the sparsemax/entmax15 rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = [torch.float32] if args.no_bf16 else [torch.float32, torch.bfloat16]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    start = time.perf_counter()
    rows = run(shapes, dtypes, args.delta, args.quick, not args.no_entmax)
    if args.layouts:
        rows += layout_rows(args.delta, args.quick, torch.Generator().manual_seed(1))
    table = format_table(rows)
    print(table)
    print(
        f"\nCPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}, delta={args.delta}; "
        f"forward+backward, medians of paired per-repeat ratios; {time.perf_counter() - start:.0f} s."
    )
    return table


if __name__ == "__main__":
    main()
