"""Every ``lightning-assoftmax fit`` command in the README and docs/ carries an explicit stopping
point, and the documented command for a user's own CSV ends within its documented time."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import lightning_assoftmax

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STOPS = ("--trainer.max_epochs", "--trainer.max_steps", "--trainer.max_time", "--trainer.fast_dev_run")
# docs/data.md states this budget for its TextFile commands (2 CPU cores, tokenizer cached or not).
TEXT_FILE_BUDGET_S = 120


def _bash_commands() -> list[tuple[str, str]]:
    """``(page:line, command)`` of every CLI command in a ```bash block, continuation lines joined."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
            start = text[: block.start()].count("\n") + 2
            joined = block.group(1).replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines()):
                command = line.split("#", 1)[0].strip()
                if re.match(r"(lightning-assoftmax|python -m lightning_assoftmax) ", command):
                    found.append((f"{page.relative_to(ROOT)}:{start + offset}", command))
    return found


def _documented_configs() -> dict[str, str]:
    """The YAML blocks of the pages that open with ``# <name>.yaml``, by name."""
    configs = {}
    for page in PAGES:
        for block in re.finditer(r"```yaml\n# (\S+\.yaml)\n(.*?)```", page.read_text(), flags=re.S):
            configs[block.group(1)] = block.group(2)
    return configs


def _config_stops(args: list[str]) -> bool:
    documented = _documented_configs()
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("--config", "-c"):
            text = (ROOT / value).read_text() if (ROOT / value).is_file() else documented.get(value, "")
            config = yaml.safe_load(text) or {}
            trainer = config.get("trainer", {}) if isinstance(config, dict) else {}
            if any(trainer.get(key) not in (None, -1) for key in ("max_epochs", "max_steps", "max_time")):
                return True
    return False


FITS = [(where, command) for where, command in _bash_commands() if " fit " in f"{command} "]


def test_the_documented_commands_were_found():
    assert len(FITS) >= 15
    assert any("TextFile" in command for _, command in FITS)


@pytest.mark.parametrize(("where", "command"), FITS, ids=[where for where, _ in FITS])
def test_every_documented_fit_has_an_explicit_stopping_point(where, command):
    args = shlex.split(command)
    assert any(arg.startswith(STOPS) for arg in args) or _config_stops(args), (
        f"{where}: `{command}` states no stopping point; give it --trainer.max_epochs (or a "
        "--config that sets it)."
    )


@pytest.mark.slow
def test_the_documented_text_file_command_ends_within_its_budget(tmp_path):
    (command,) = [c for w, c in FITS if w.startswith("docs/data.md") and "train.csv" in c]
    # The training file of docs/data.md's first example: 20 rows of each of three topics.
    rows = ["text,label"] + [
        f'"{text} {i}",{label}'
        for i in range(20)
        for text, label in [("Shares rose after the results", "business"), ("The striker scored twice", "sport"),
                            ("The minister announced the budget", "politics")]
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    args = shlex.split(command)[1:] + ["--trainer.enable_progress_bar=false"]
    source = str(Path(lightning_assoftmax.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lightning_assoftmax", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TEXT_FILE_BUDGET_S)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Run summary: loss as_softmax(delta=0.1), TextClassifier on TextFile" in result.stdout
    assert elapsed < TEXT_FILE_BUDGET_S
