"""``run_compare``: run (or read) a grid, then its statistics, tables, files and figure."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from lightning_assoftmax.compare.grid import CompareGrid, FitFactory
from lightning_assoftmax.compare.report import (
    accuracy_table,
    correlation_table,
    environment,
    paired_lines,
    write_figure,
    write_fits_csv,
)
from lightning_assoftmax.compare.stats import summarize

__all__ = ["CompareResult", "run_compare", "summary_text"]


@dataclass
class CompareResult:
    """The fits (grid order: arm, then seed), the per-arm rows of :func:`summarize`, the markdown
    report and the files written (name -> path)."""

    fits: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    report: str
    files: dict[str, str] = field(default_factory=dict)


def _split(fits: list[dict[str, Any]]) -> str:
    splits = {fit.get("evaluated_on", "test") for fit in fits}
    return "test" if splits in ({"test"}, set()) else "val"


def summary_text(grid: CompareGrid, fits: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The tables and the notes under them (what ``summary.md`` holds besides the header)."""
    split = _split(fits)
    expected = len(grid.arms) * len(grid.seeds)
    notes = [
        f"{len(fits)} of {expected} fits ({len(grid.arms)} arms x {len(grid.seeds)} seeds {grid.seeds}); "
        f"each fit's best weights chosen by {grid.monitor} ({grid.mode}) over its validation runs; "
        f"baseline {grid.arm_keys[0]}."
    ]
    if split == "val":
        notes.append(
            "The datamodule has no test set: the acc and macro-F1 columns are the best weights' scores "
            "on the validation set, the same data that chose them (optimistic)."
        )
    notes.append(
        "Mean ± std over seeds. The difference to the baseline is paired by seed (same seed, data order "
        "and, for the same architecture, initial weights): its mean ± std over seeds and 95% interval, "
        "the two-sided paired t-test p and p adjusted by Holm over the arms. Time ratios: per seed "
        "against the baseline's fit, then the median."
    )
    parts = [accuracy_table(rows, grid.monitor, split), " ".join(notes)]
    lines = paired_lines(rows, split)
    if lines:
        parts.append(lines)
    parts.append(
        "Loss against accuracy over each fit's validation runs (mean ± std over seeds; -1: the loss "
        "tracks accuracy), the validation cross entropy and the training masked ratio at the end:"
    )
    parts.append(correlation_table(rows))
    return "\n\n".join(parts) + "\n"


def run_compare(
    grid: CompareGrid,
    factory: FitFactory | None,
    command: str = "",
    summarize_only: bool = False,
    progress: bool = True,
    echo: bool = True,
    description: str = "",
) -> CompareResult:
    """Run this share of ``grid`` (unless ``summarize_only``: only read its journals), then
    summarize every fit found and, with an output folder, write ``fits.csv``, ``summary.md`` and
    ``compare.png`` (a shard run writes only its journal). Prints the table when ``echo``."""
    started = time.perf_counter()
    if summarize_only:
        if grid.out is None or not grid.out.is_dir():
            raise ValueError(f"--summarize_only reads the journals of --out, but {grid.out} is no folder.")
        grid.fits = grid.load()
        fits = grid.sorted_fits()
    else:
        if factory is None:
            raise ValueError("run_compare needs a factory unless summarize_only.")
        fits = grid.run(factory, progress=progress)
    elapsed = time.perf_counter() - started
    rows = summarize(fits, grid.arm_keys)
    body = summary_text(grid, fits, rows) if fits else "No fit finished yet.\n"
    result = CompareResult(fits, rows, body)
    sharded = grid.shard[1] > 1 and not summarize_only
    if grid.out is not None and not sharded:
        env = environment()
        header = [
            "# Comparison",
            "",
            f"`{command}`" if command else "",
            "",
            description,
            "",
        ]
        footer = [
            "",
            f"Versions and machine: {', '.join(f'{k} {v}' for k, v in env.items())}.",
            f"{'Read' if summarize_only else 'Run'} in {elapsed / 60:.1f} min.",
            "",
            "Settings:",
            "",
            "```json",
            json.dumps(grid.settings, indent=1, sort_keys=True, default=str),
            "```",
            "",
        ]
        markdown = "\n".join(line for line in header if line is not None) + body + "\n".join(footer)
        (grid.out / "summary.md").write_text(markdown)
        write_fits_csv(fits, grid.out / "fits.csv")
        result.files = {"summary": str(grid.out / "summary.md"), "fits": str(grid.out / "fits.csv")}
        if fits and write_figure(rows, fits, grid.out / "compare.png", grid.monitor, _split(fits)):
            result.files["figure"] = str(grid.out / "compare.png")
    if echo:
        print()
        print(body, end="", flush=True)
        if result.files:
            print(f"\nwritten to {grid.out}: {', '.join(_file_name(p) for p in result.files.values())}", flush=True)
        elif sharded:
            print(
                f"\nshard {grid.shard[0]}/{grid.shard[1]} done ({grid.journal_path}); when every shard has "
                "finished, rerun the same command with --summarize_only=true (and without --shard) to merge them.",
                flush=True,
            )
    return result


def _file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]
