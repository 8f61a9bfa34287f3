"""README.md stays honest: every make target it names exists, and every `--flag` it shows exists in
the tool it is shown with (or, in prose, in some tool), as the tools' own --help reports it."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if not p.stem.startswith("_"))
# Flags of other programs the README shows (torchrun's, and Python's -m).
FOREIGN = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-backend",
           "--rdzv-endpoint", "--rdzv-id", "--no-stream", "--stream"}
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
    # The developer programs the README documents count too (make compile-check's and the quantization
    # accuracy benchmark's own flags).
    known = (set().union(*(tool_flags(t) for t in TOOLS)) | help_flags("-m", "benchmarks.compile_check")
             | help_flags("benchmarks/quant_accuracy.py") | FOREIGN)
    named = set(FLAG.findall(README))
    assert not named - known, f"README names flags no tool has: {sorted(named - known)}"
