"""Packaging rules that a resolver would only reveal on the wrong machine.

An Ascend host gets Triton from triton-ascend, which installs the `triton` module itself: anything
in the Ascend install that pulls the stock `triton` distribution would overwrite it. That comes in
two ways: a dependency that requires stock triton (xgrammar's x86_64 wheel does; llguidance, our
grammar engine, has no dependencies), or pip replacing the pinned torch with a newer one whose
x86_64 build requires triton, which an unpinned torch-npu causes (each torch-npu release requires
its own torch minor). Checked for real with `pip install --dry-run -e ".[ascend,serve]"` in a
fresh venv holding the pinned torch (README, "Install").
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_the_ascend_install_never_pulls_stock_triton():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    ascend_install = _names(project["dependencies"] + extras["ascend"] + extras["serve"])
    assert not ascend_install & {"triton", "xgrammar"}, ascend_install
    assert "triton" in _names(extras["triton"])  # stock Triton only through its own extra
    torch_pin = re.search(r"TORCH_PIN\s*:=\s*torch==(\d+\.\d+)\.", (ROOT / "Makefile").read_text()).group(1)
    npu = [r for r in extras["ascend"] if r.lower().startswith("torch-npu")]
    assert npu == [f"torch-npu=={torch_pin}.*"], (npu, torch_pin)


def _pins(lock: Path) -> dict[str, str]:
    """name -> version of a pip-compile lock's `name==version` lines."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_the_locks_pin_everything_make_install_asks_for_and_the_torch_it_installs():
    """make install installs with requirements/lock-<extra>.txt as constraints: a requirement the lock
    does not pin would resolve to whatever is newest that day. A lock made before a dependency was
    added to pyproject.toml fails here, not on a user's machine."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    torch_pin = re.search(r"TORCH_PIN\s*:=\s*torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    for kernel_extra in ("triton", "ascend"):
        pins = _pins(ROOT / "requirements" / f"lock-{kernel_extra}.txt")
        wanted = _names(project["dependencies"] + extras[kernel_extra] + extras["serve"] + extras["dev"])
        assert not wanted - set(pins), f"lock-{kernel_extra}.txt does not pin {sorted(wanted - set(pins))}"
        assert pins["torch"] == torch_pin, (kernel_extra, pins["torch"], torch_pin)
        assert "setuptools" in pins  # the build backend of `pip install -e .` is pinned too (PIP_CONSTRAINT)
    assert "triton" not in _pins(ROOT / "requirements" / "lock-ascend.txt")
