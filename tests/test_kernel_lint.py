"""tools/kernel_lint.py: a kernel that breaks the device rules is caught, a persistent one that keeps
them passes, and the project's own kernels pass (as `make lint` runs it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tools.kernel_lint import BLOCK, WARN, lint_source

REPO = Path(__file__).resolve().parents[1]

BAD = textwrap.dedent('''
    import torch
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice


    @triton.jit
    def _row_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one program per row, no loop
        x = tl.load(x_ptr + row * BLOCK + tl.arange(0, BLOCK))
        y = tl.dot(x, x) + tl.sin(x) + libdevice.erf(x)
        y = tl.inline_asm_elementwise("mov.f32 $0, $1;", "=r,r", [y], dtype=tl.float32, is_pure=True, pack=1)
        tl.atomic_add(out_ptr + row, tl.sum(y.to(tl.float64), 0))


    def launch(x, out):
        torch.cuda.synchronize()
        _row_kernel[(x.shape[0],)](x, out, BLOCK=128)
''')

GOOD = textwrap.dedent('''
    import triton
    import triton.language as tl

    from qwen_vl_triton.kernels.target import Work, current_target


    @triton.jit
    def _rows_kernel(x_ptr, n_rows, BLOCK: tl.constexpr):
        """A persistent kernel; tl.sin named only here, in a docstring, and in a comment (tl.sin)."""
        for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            x = tl.load(x_ptr + row * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
            tl.store(x_ptr + row * BLOCK + tl.arange(0, BLOCK), tl.dot(x, x, input_precision="ieee"))


    def launch(x):
        grid = (current_target(x.device).grid(x.shape[0], Work.ROWS),)
        _rows_kernel[grid](x, x.shape[0], BLOCK=128)
''')


def test_a_kernel_breaking_the_rules_is_caught():
    findings, kernels = lint_source(Path("bad.py"), BAD)
    assert kernels == 1
    blockers = {f.rule for f in findings if f.level == BLOCK}
    warnings = {f.rule for f in findings if f.level == WARN}
    assert blockers == {"libdevice", "asm", "dot-precision", "device-api", "grid"}
    assert warnings == {"no-loop", "sin-cos", "atomic", "fp64"}


def test_a_persistent_kernel_keeping_the_rules_passes():
    assert lint_source(Path("good.py"), GOOD) == ([], 1)


def test_the_project_kernels_pass():
    run = subprocess.run([sys.executable, "tools/kernel_lint.py", "qwen_vl_triton/kernels"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout
    assert "0 blockers" in run.stdout
