"""Ascend 910B / A3: compile with triton-ascend and bishengir (no NPU, no CANN needed).

triton-ascend lowers a kernel to linalg (triton-adapter-opt) and hands it to `bishengir-compile`,
which tiles it, splits it over cube and vector cores, plans the unified buffer (UB) and inserts
the syncs: every check that can reject a kernel for the chip, UB overflow included, runs there.
bishengir then calls `hivmc` and `bisheng`, which ship only with CANN. A compile that reaches
hivmc has passed every check; that is where this one stops and counts as built.

`bishengir-compile` is put on PATH as a small shim (this module run as a script) that calls the
real one with `--save-temps`, reads the planned UB use from the final HIVM IR (the largest
offset + size of a buffer placed in UB), writes that down for the check, and, when only hivmc was
missing, leaves an empty object file so that Triton's launch goes on to the next kernel.
QVL_KEEP_IR=DIR keeps each kernel's final HIVM IR there (to see what fills the UB).

Runs in its own venv (`make compile-check` makes .venv-ascend): triton-ascend and stock Triton
are both the `triton` module.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HIVMC_MISSING = "Cannot find hivmc"
RESULT_DIR_ENV = "QVL_BISHENGIR_RESULTS"
REAL_COMPILER_ENV = "QVL_BISHENGIR_COMPILE"

_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1}
_CONSTANT = re.compile(r"(%[\w.]+) = arith\.constant (-?\d+) : i64")
# `%x = hivm.hir.pointer_cast(%offset[, %offset2]) : memref<64x128xf32[, layout], #hivm.address_space<ub>>`
_UB_BUFFER = re.compile(r"hivm\.hir\.pointer_cast\(([^)]*)\)[^:]*: memref<([^,>]+)[^>]*#hivm\.address_space<ub>>")


def planned_ub_bytes(hivm_ir: str) -> int:
    """The UB bytes a kernel's final HIVM IR places: max over buffers of offset + size."""
    constants = {name: int(value) for name, value in _CONSTANT.findall(hivm_ir)}
    top = 0
    for offsets, shape in _UB_BUFFER.findall(hivm_ir):
        *dims, element = shape.strip().split("x")  # "64x128xf32" -> 64, 128, f32
        if element not in _ELEMENT_BYTES:
            raise ValueError(f"UB buffer of unknown element type: memref<{shape}>")
        size = math.prod(int(d) for d in dims) * _ELEMENT_BYTES[element]
        for offset in offsets.split(","):
            top = max(top, constants.get(offset.strip(), 0) + size)
    return top


def uses_cube(hivm_ir: str) -> bool:
    """Whether the kernel runs matmuls on the cube unit (cube + vector) or vector cores only."""
    return "hivm.hir.mmad" in hivm_ir or "address_space<cc>" in hivm_ir


def setup(arch: str, work_dir: Path) -> None:
    """Make triton-ascend compile for `arch` on this machine: the shim first on PATH, the arch
    given to the A2/A3 stage (it would ask CANN), a placeholder ASCEND_HOME_PATH."""
    import ascendnpuir
    from triton.backends import backends

    real = Path(ascendnpuir.__file__).parent / "bin" / "bishengir-compile"
    shim_dir = work_dir / "bin"
    shim_dir.mkdir(parents=True, exist_ok=True)
    shim = shim_dir / "bishengir-compile"  # triton-ascend picks its options by this name
    shim.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{Path(__file__).resolve()}' \"$@\"\n")
    shim.chmod(0o755)
    (work_dir / "results").mkdir(exist_ok=True)
    (work_dir / "ascend-home").mkdir(exist_ok=True)
    os.environ["PATH"] = f"{shim_dir}:{real.parent}:{os.environ['PATH']}"
    os.environ[REAL_COMPILER_ENV] = str(real)
    os.environ[RESULT_DIR_ENV] = str(work_dir / "results")
    os.environ.setdefault("ASCEND_HOME_PATH", str(work_dir / "ascend-home"))

    class _Arch:  # stands in for NPUUtils, which builds a CANN extension to ask the device
        def get_arch(self) -> str:
            return arch

    backends["ascend"].compiler.add_stages.__globals__["NPUUtils"] = _Arch


def take_result() -> dict | None:
    """The shim's report of the last kernel it compiled (None if it wrote none)."""
    results = sorted(Path(os.environ[RESULT_DIR_ENV]).glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not results:
        return None
    report = json.loads(results[-1].read_text())
    for path in results:
        path.unlink()
    return report


def _shim(argv: list[str]) -> int:
    """bishengir-compile with --save-temps; reaching hivmc is success (see the module doc)."""
    out = Path(argv[argv.index("-o") + 1])
    with tempfile.TemporaryDirectory() as temps:
        run = subprocess.run([os.environ[REAL_COMPILER_ENV], *argv, f"--save-temps={temps}"],
                             capture_output=True, text=True)
        hivm = Path(temps) / "module.hivm.opt.mlir"
        # Built (CANN's hivmc on PATH), or stopped only for want of hivmc: every check passed.
        passed = run.returncode == 0 or HIVMC_MISSING in run.stdout + run.stderr
        if not passed or not hivm.exists():
            sys.stdout.write(run.stdout)
            sys.stderr.write(run.stderr)
            return run.returncode or 1
        ir = hivm.read_text()
        if os.environ.get("QVL_KEEP_IR"):
            Path(os.environ["QVL_KEEP_IR"], f"{os.getpid()}.mlir").write_text(ir)
    report = {"ub_bytes": planned_ub_bytes(ir), "cube": uses_cube(ir)}
    results = Path(os.environ[RESULT_DIR_ENV])
    (results / f"{os.getpid()}.json").write_text(json.dumps(report))
    if run.returncode != 0:  # no hivmc: an empty object, whichever name this triton-ascend reads
        for suffix in (".o", "_reloc.o"):
            out.with_name(out.name + suffix).write_bytes(b"")
    return 0


if __name__ == "__main__":
    sys.exit(_shim(sys.argv[1:]))
