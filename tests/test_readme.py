"""README.md stays honest: every make target it names exists, every `--flag` it shows exists in the
tool it is shown with (or, in prose, in some tool), as the tools' own --help reports it, and every
measured figure it quotes is its results file's (tests/readme_figures.py: the figures, their sources,
and the passages where a number without a source fails)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.readme_figures import FIGURES, GUARDED, NOT_MEASURED, Figure

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if not p.stem.startswith("_"))
# Flags of other programs the README shows (torchrun's, and Python's -m).
# Other programs' flags the README names: torchrun's, the openai CLI's, and vLLM's where it says which of ours
# stands for one.
FOREIGN = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-backend",
           "--rdzv-endpoint", "--rdzv-id", "--no-stream", "--stream", "--allowed-media-domains",
           "--generation-config", "--chat-template", "--trust-request-chat-template", "--tensor-parallel-size"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


@cache
def help_flags(*command: str) -> frozenset[str]:
    done = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)  # a hang guard only: --help takes about a second
    assert done.returncode == 0, f"{' '.join(command)} --help failed:\n{done.stderr[-2000:]}"
    return frozenset(FLAG.findall(done.stdout))


def tool_flags(tool: str) -> frozenset[str]:
    return help_flags(f"tools/{tool}.py")


def command_lines() -> list[str]:
    """README lines joined across trailing backslashes (one shell command per entry)."""
    lines, current = [], ""
    for line in README.splitlines():
        current += line.rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    return lines


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z_-]*):", makefile, flags=re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z_-]*)", README))
    assert named, "the README names no make target"
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


@pytest.mark.parametrize("tool", TOOLS)
def test_flags_shown_with_a_tool_exist(tool):
    shown = set()
    for line in command_lines():
        if f"tools/{tool}.py" in line:
            shown |= set(FLAG.findall(line.split(f"tools/{tool}.py", 1)[1]))
    missing = shown - tool_flags(tool) - FOREIGN
    assert not missing, f"README shows tools/{tool}.py with flags it does not have: {sorted(missing)}"


def test_every_flag_in_the_readme_exists_somewhere():
    # The developer programs the README documents count too (make compile-check's, make tune's and the
    # quantization accuracy benchmark's own flags).
    known = (set().union(*(tool_flags(t) for t in TOOLS)) | help_flags("-m", "benchmarks.compile_check")
             | help_flags("benchmarks/quant_accuracy.py") | help_flags("benchmarks/tune.py") | FOREIGN)
    named = set(FLAG.findall(README))
    assert not named - known, f"README names flags no tool has: {sorted(named - known)}"


# ---- measured figures (tests/readme_figures.py)

TEXT = " ".join(README.split())  # one space for every run of whitespace: line breaks may move
# A number: digits, with decimals or thousands, maybe an exponent. Part of a name (Qwen2.5, sm_90, fp32,
# 7B, 224x224, top-1) when a letter or "_" touches it (or a word's hyphen precedes it), except a speed-up's "x".
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)\d+(?:[.,]\d+)*(?:e-?\d+)?(?![.,]?\d)(?![A-Za-wyz_]|x\w)")
CODE = re.compile(r"```.*?```|`[^`]*`")


def figure_id(figure: Figure) -> str:
    """The passage with # for its figures: "they take # s of our # s, ..."."""
    return " ".join(re.sub(r"\{[^}]*\}|[`*|]", lambda m: "#" if m.group()[0] == "{" else " ", figure.text).split())[:60]


def near(template: str) -> str:
    """What the README says where a figure's passage should be: around its longest literal part."""
    parts = sorted((p.strip() for p in re.split(r"\{[^}]*\}", " ".join(template.split()))), key=len)
    at = TEXT.find(parts[-1]) if parts and parts[-1] else -1
    return "no passage like it" if at < 0 else f"the README has: ...{TEXT[max(0, at - 80):at + len(parts[-1]) + 80]}..."


@pytest.mark.parametrize("figure", FIGURES, ids=figure_id)
def test_measured_figure_is_its_sources(figure: Figure):
    expected = figure.expected()
    found = expected in TEXT
    assert found, f"README should say, from {figure.source}:\n  {expected}\n{near(figure.text)}"


def covered() -> list[bool]:
    """Per character of TEXT: inside a figure's passage, a NOT_MEASURED snippet or code."""
    mask = [False] * len(TEXT)
    snippets = [" ".join(s.split()) for s in NOT_MEASURED]
    for figure in FIGURES:
        with contextlib.suppress(AssertionError):  # a figure whose source fails: test_measured_figure_... says so
            snippets.append(figure.expected())
    spans = [m.span() for m in CODE.finditer(TEXT)]
    for snippet in snippets:
        spans += [(m.start(), m.start() + len(snippet)) for m in re.finditer(re.escape(snippet), TEXT)]
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    return mask


def test_every_number_in_the_results_passages_has_a_source():
    mask = covered()
    loose = []
    for first, last in GUARDED:
        start = TEXT.find(first)
        assert start >= 0, f"GUARDED passage start {first!r} is not in the README"
        end = TEXT.find(last, start + len(first))
        assert end > start, f"GUARDED passage end {last!r} does not follow {first!r}"
        loose += [f"{m.group()!r} in ...{TEXT[max(0, m.start() - 60):m.end() + 30]}..."
                  for m in NUMBER.finditer(TEXT, start, end) if not all(mask[m.start():m.end()])]
    assert not loose, ("numbers in README results passages with no source: add a Figure (a measurement) or a "
                       "NOT_MEASURED snippet (configuration) in tests/readme_figures.py:\n" + "\n".join(loose))


def test_not_measured_snippets_are_in_the_readme():
    stale = [s for s in NOT_MEASURED if " ".join(s.split()) not in TEXT]
    assert not stale, f"NOT_MEASURED snippets the README no longer has: {stale}"


def test_the_demo_block_is_what_make_demo_prints(tmp_path):
    """The README's `make demo` output, line for line, is what `make demo` prints now: the same lines
    in the same order, the same token counts and text (the weights are seeded), timings aside (every
    number on a line that times something may differ; the line itself may not go missing)."""
    intro = README.index("`make demo` on a 2-core CPU")
    block = README[README.index("```\n", intro) + 4:README.index("\n```", README.index("```\n", intro) + 4)]
    env = {k: v for k, v in os.environ.items() if k not in ("QVL_KERNELS", "TRITON_INTERPRET")}
    env["QVL_CACHE"] = str(tmp_path)  # a fresh cache: the checkpoint is made, as on a first run
    done = subprocess.run([sys.executable, "tools/generate.py", "--max_output_length", "32"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    printed = done.stdout.replace(str(tmp_path), "~/.cache/qwen-vl-triton").strip().splitlines()
    shown = block.replace("/root/.cache/qwen-vl-triton", "~/.cache/qwen-vl-triton").splitlines()
    timed = re.compile(r" s\b|tok/s|req/s| ms\b|GiB")

    def shape(line: str) -> str:
        line = "".join(c for c in line if c.isprintable())  # the random text's control bytes show as nothing
        return re.sub(r"\d+(\.\d+)?", "#", line) if timed.search(line) else line

    assert [shape(line) for line in shown] == [shape(line) for line in printed], (
        "README's demo block differs from what `make demo` prints now:\n" + "\n".join(printed))
