"""The documentation cannot rot: its examples run, its links resolve, the tests it cites exist.

Every ```python block of README.md and docs/*.md runs here: the blocks of one page in order, in
one namespace, inside a temporary working directory (nothing is written to the checkout). A block
that must not run is preceded by ``<!-- no-run: <reason> -->`` on the previous non-blank line.
Configs in ```yaml blocks that look like ``lightning-assoftmax`` configs are parsed by the CLI.
"""

from __future__ import annotations

import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages whose links and code are checked too (they hold no Python examples).
LINKED_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]

# Pages whose examples train (Trainer.fit) for more than a couple of seconds, or tokenize the BBC
# News articles; they still run in `make test`.
SLOW_PAGES = {
    "README.md",
    "docs/cli.md",
    "docs/compare.md",
    "docs/data.md",
    "docs/distributed.md",
    "docs/huggingface.md",
    "docs/loss_accuracy_correlation.md",
    "docs/mixin.md",
}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:(?P<reason>.*?)-->\s*$")
# Markdown links and images: [text](target) and ![alt](target); targets without spaces.
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
TEST_REFERENCE = re.compile(r"(?P<path>tests/[\w/]+\.py)::(?P<name>\w+)")
# Top-level keys of a LightningCLI config (`lightning-assoftmax fit --config`).
CLI_KEYS = {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"}


@dataclass
class Block:
    language: str  # first word of the fence's info string, as written
    line: int  # 1-based line of the first code line in the page
    code: str
    no_run: str | None  # the reason given, "" if the marker has none, None without a marker


def _relative(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the no-run marker that precedes each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, indent = match["fence"], match["indent"]
        words = match["info"].split()
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = NO_RUN.match(previous)
        end = index + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence[0] * len(fence)) and not lines[end].strip().strip(fence[0])
        ):
            end += 1
        assert end < len(lines), f"{_relative(page)}:{index + 1}: code block is never closed"
        body = textwrap.dedent("\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[index + 1 : end]))
        blocks.append(Block(words[0] if words else "", index + 2, body, marker["reason"].strip() if marker else None))
        index = end + 1
    return blocks


def _page_params():
    params = []
    for page in PAGES:
        name = _relative(page)
        marks = [pytest.mark.slow] if name in SLOW_PAGES else []
        params.append(pytest.param(page, marks=marks, id=name))
    return params


# -- the examples run ------------------------------------------------------------------------------
# The resume example resumes into a fresh checkpoint directory, as distributed.md advises.
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("page", _page_params())
def test_python_examples_run(page, cli_isolated):
    name = _relative(page)
    namespace: dict = {"__name__": "__docs__"}
    for block in fenced_blocks(page):
        if block.language != "python" or block.no_run is not None:
            continue
        # Leading newlines put tracebacks on the page's own line numbers.
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        try:
            exec(code, namespace)
        except Exception as error:  # noqa: BLE001 - any failure of a doc example is reported the same way
            pytest.fail(
                f"{name}: the python block at line {block.line} fails with {type(error).__name__}: {error}\n"
                + "".join(traceback.format_exception(error)[-6:])
            )


def test_the_documentation_pages_are_there():
    names = {_relative(page) for page in PAGES}
    assert "README.md" in names and "docs/index.md" in names
    assert SLOW_PAGES <= names, f"SLOW_PAGES names pages that do not exist: {sorted(SLOW_PAGES - names)}"


def test_readme_is_a_short_entry_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move details to docs/"
    first_python = next(b.line for b in fenced_blocks(ROOT / "README.md") if b.language == "python")
    assert first_python <= 80, f"the first usage example of README.md starts at line {first_python}"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=_relative)
def test_no_run_markers_give_a_reason_and_precede_a_python_block(page):
    blocks = fenced_blocks(page)
    for block in blocks:
        if block.no_run is not None:
            assert block.language == "python", (
                f"{_relative(page)}:{block.line}: a no-run marker precedes a {block.language or 'plain'} block; "
                "only python blocks run"
            )
            assert block.no_run, f"{_relative(page)}:{block.line}: `<!-- no-run: -->` needs a reason"
    markers = sum(bool(NO_RUN.match(line)) for line in page.read_text(encoding="utf-8").splitlines())
    assert markers == sum(block.no_run is not None for block in blocks), (
        f"{_relative(page)}: a no-run marker is not directly followed by a code block"
    )


@pytest.mark.parametrize("page", LINKED_PAGES, ids=_relative)
def test_no_python_block_escapes_the_runner(page):
    for block in fenced_blocks(page):
        spelled = block.language.lower()
        assert block.language == "python" or not ("py" in spelled or spelled in {"ipython", "pycon"}), (
            f"{_relative(page)}:{block.line}: a ```{block.language} block is not run; spell it ```python"
        )
        if not block.language:
            looks_like_python = re.search(r"^\s*(import \w|from [\w.]+ import |def \w+\(|class \w+)", block.code, re.M)
            assert not looks_like_python, (
                f"{_relative(page)}:{block.line}: an unlabelled block holds Python; label it ```python "
                "(or ```text for output)"
            )


# -- links and references resolve -------------------------------------------------------------------
def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors, in_code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", LINKED_PAGES, ids=_relative)
def test_relative_links_point_to_files_and_headings_that_exist(page):
    text = page.read_text(encoding="utf-8")
    outside_code = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for match in LINK.finditer(outside_code):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        assert resolved.exists(), f"{_relative(page)}: link to {target!r}, but {path_part!r} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{_relative(page)}: link to {target!r}, no such heading"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=_relative)
def test_cited_tests_exist(page):
    for match in TEST_REFERENCE.finditer(page.read_text(encoding="utf-8")):
        path = ROOT / match["path"]
        assert path.exists(), f"{_relative(page)} cites {match[0]}, but {match['path']} does not exist"
        source = path.read_text(encoding="utf-8")
        assert re.search(rf"^\s*def {match['name']}\(", source, re.M), (
            f"{_relative(page)} cites {match[0]}, but {match['path']} has no test {match['name']}"
        )


# -- config examples parse ----------------------------------------------------------------------------
def _config_blocks():
    params = []
    for page in PAGES:
        for block in fenced_blocks(page):
            if block.language == "yaml":
                config = yaml.safe_load(block.code)
                if isinstance(config, dict) and set(config) <= CLI_KEYS:
                    params.append(pytest.param(block.code, id=f"{_relative(page)}:{block.line}"))
    return params


@pytest.mark.parametrize("config", _config_blocks())
def test_config_examples_parse(config, cli_isolated, capsys):
    from lightning_assoftmax.cli import ASSoftmaxCLI

    path = cli_isolated / "config.yaml"
    path.write_text(config, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        ASSoftmaxCLI(args=["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    for key in ("model", "data"):
        if key in yaml.safe_load(config):
            assert printed[key]["class_path"].startswith("lightning_assoftmax.")
