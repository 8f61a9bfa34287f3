"""`make device-check` runs with the machine's own Python, which may lack torch or triton: it then
says what to install (or which interpreter to pick) and exits 2, before any step, with no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qwen_vl_triton.benchmarks import device_check

REPO = Path(__file__).resolve().parents[1]


def test_without_torch_make_device_check_says_what_to_install():
    """The Makefile's recipe (PYTHONPATH=<checkout> python benchmarks/device_check.py), run by this
    interpreter with -S: no site-packages, so neither torch nor triton imports, as on a bare machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": str(REPO)}
    bare = [sys.executable, "-S"]
    probe = subprocess.run([*bare, "-c", "import torch"], env=env, capture_output=True, text=True, check=False)
    assert probe.returncode != 0, "torch imports without site-packages: this test needs an interpreter without it"
    done = subprocess.run([*bare, "benchmarks/device_check.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # a hang guard only: it exits at once
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "ModuleNotFoundError" not in done.stderr
    assert "cannot import torch (No module named 'torch'), triton (No module named 'triton')" in done.stderr
    assert "CUDA build of torch that matches this machine's NVIDIA driver" in done.stderr
    assert "DEVICE_PY=/path/to/python make device-check" in done.stderr
    assert "==" not in done.stdout  # no step started


def test_without_triton_only_triton_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert device_check.main([]) == 2
    err = capsys.readouterr().err
    assert "cannot import triton (" in err and "torch (" not in err and "DEVICE_PY=" in err
