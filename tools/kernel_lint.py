"""Read the Triton kernels for what triton-ascend cannot compile or the project's device rules forbid
(docs/DESIGN.md, "Device rules"). No compiler, no device: it parses the sources.

    python tools/kernel_lint.py qwen_vl_triton/kernels   # what `make lint` runs

Prints one line per finding (`path:line: BLOCK|warn rule: why`) and a summary; exits 1 on a
blocker, on a file that does not parse, or when it finds no @triton.jit function at all (a wrong
path must not pass). Rules:

  blockers  asm          tl.inline_asm_elementwise: inline PTX has no Ascend lowering
            libdevice    tl.extra.* / libdevice: CUDA-only, and it fails in the CPU interpreter
            tf32         input_precision="tf32..." or allow_tf32=True: NVIDIA-only
            dot-precision  tl.dot without input_precision: NVIDIA rounds fp32 operands to TF32
            device-api   torch.cuda / torch.npu in kernel code: launchers read the device through
                         kernels/target.py's Target
            grid         a kernel launched on a grid not sized by Target.grid(n, Work.KIND): Ascend
                         pays per launched program, and grids stop at 65535
  warnings  no-loop      a kernel that reads tl.program_id but has no loop: one program per row/tile
            sin-cos      tl.sin / tl.cos lower to libdevice on NVIDIA (its slow path spills)
            atomic       tl.atomic_*: slow on Ascend, keep them out of hot paths
            fp64         tl.float64: no cube-unit path on Ascend
            debug-print  tl.device_print / tl.static_print / print left in a kernel
            autotune     triton.autotune: raises on the CPU interpreter with several configs; tiles
                         come from the Target
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

BLOCK, WARN = "BLOCK", "warn"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One rule broken at one place."""

    path: Path
    line: int
    level: str  # BLOCK or warn
    rule: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.level} {self.rule}: {self.why}"


def dotted(node: ast.AST) -> str:
    """`tl.extra.cuda.libdevice` for that attribute chain ("" for anything not rooted at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def is_jit(fn: ast.FunctionDef) -> bool:
    """Decorated with triton.jit (bare or called with options)."""
    for deco in fn.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if dotted(target).split(".")[-1] == "jit":
            return True
    return False


def _name_rules(path: Path, tree: ast.Module) -> Iterator[Finding]:
    """Rules that look at a name wherever it is used (code only: comments and docstrings are not
    names in the tree). A chain is judged once, whole: `tl.extra.cuda` is not judged again as `tl.extra`."""
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                "libdevice" in node.module or ".extra" in node.module
                or any(alias.name == "libdevice" for alias in node.names)):
            yield Finding(path, node.lineno, BLOCK, "libdevice", "imports CUDA libdevice: not on Ascend, fails in "
                                                                 "the interpreter")
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        name = dotted(node)
        parts = name.split(".")
        if name.endswith("inline_asm_elementwise"):
            yield Finding(path, node.lineno, BLOCK, "asm", "inline asm has no Ascend lowering")
        elif name.startswith("tl.extra") or "libdevice" in parts:
            yield Finding(path, node.lineno, BLOCK, "libdevice", "CUDA libdevice: not on Ascend, fails in the "
                                                                "interpreter")
        elif name.startswith(("torch.cuda", "torch.npu")):
            yield Finding(path, node.lineno, BLOCK, "device-api", f"{name}: read the device through "
                                                                  "kernels/target.py's Target")
        elif parts[0] == "tl" and parts[-1].startswith("atomic_"):
            yield Finding(path, node.lineno, WARN, "atomic", "atomics are slow on Ascend: keep them out of hot paths")
        elif name == "tl.float64":
            yield Finding(path, node.lineno, WARN, "fp64", "fp64 has no cube-unit path on Ascend")
        elif name in ("tl.sin", "tl.cos", "tl.math.sin", "tl.math.cos"):
            yield Finding(path, node.lineno, WARN, "sin-cos", "lowers to libdevice on NVIDIA, whose slow path "
                                                              "spills (see kernels/rotary.py's _sin_cos)")
        elif name in ("tl.device_print", "tl.static_print"):
            yield Finding(path, node.lineno, WARN, "debug-print", "debug print left in a kernel")
        elif name == "triton.autotune":
            yield Finding(path, node.lineno, WARN, "autotune", "autotune raises on the CPU interpreter; plan "
                                                               "tiles from the Target")


def _call_rules(path: Path, tree: ast.Module) -> Iterator[Finding]:
    """Rules on call keywords: TF32 and tl.dot's precision."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        precision = kwargs.get("input_precision")
        if isinstance(precision, ast.Constant) and str(precision.value).startswith("tf32"):
            yield Finding(path, node.lineno, BLOCK, "tf32", "TF32 is NVIDIA-only")
        allow = kwargs.get("allow_tf32")
        if isinstance(allow, ast.Constant) and allow.value is True:
            yield Finding(path, node.lineno, BLOCK, "tf32", "TF32 is NVIDIA-only")
        if dotted(node.func) == "tl.dot" and precision is None:
            yield Finding(path, node.lineno, BLOCK, "dot-precision", "tl.dot without input_precision: NVIDIA "
                                                                     "computes fp32 operands in TF32")


def _kernel_rules(path: Path, fn: ast.FunctionDef) -> Iterator[Finding]:
    """Rules on one @triton.jit function."""
    nodes = list(ast.walk(fn))
    reads_pid = any(isinstance(n, ast.Attribute) and dotted(n) == "tl.program_id" for n in nodes)
    if reads_pid and not any(isinstance(n, (ast.For, ast.While)) for n in nodes):
        yield Finding(path, fn.lineno, WARN, "no-loop", f"{fn.name} has no loop: one program per row/tile (Ascend "
                                                        "wants about one program per core, looping)")
    for n in nodes:
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print":
            yield Finding(path, n.lineno, WARN, "debug-print", "print in a kernel")


def _plans_grid(expr: ast.AST) -> bool:
    """The expression calls `<target>.grid(n, Work.KIND)`."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "grid"
               and any(dotted(a).startswith("Work.") for a in n.args) for n in ast.walk(expr))


def _launch_rules(path: Path, tree: ast.Module, kernels: set[str]) -> Iterator[Finding]:
    """Every `kernel[grid](...)` of this module's kernels takes its grid from Target.grid, inline or
    through a name assigned in the same function."""
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or is_jit(fn):
            continue
        assigned: dict[str, list[ast.AST]] = {}
        for n in ast.walk(fn):
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    if isinstance(t, ast.Name):
                        assigned.setdefault(t.id, []).append(n.value)
        for n in ast.walk(fn):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                    and isinstance(n.func.value, ast.Name) and n.func.value.id in kernels):
                continue
            grid = n.func.slice
            sources = assigned.get(grid.id, []) if isinstance(grid, ast.Name) else [grid]
            if not any(_plans_grid(s) for s in sources):
                yield Finding(path, n.lineno, BLOCK, "grid", f"{n.func.value.id} launched on a grid not sized by "
                                                             "Target.grid(n, Work.KIND)")


def lint_source(path: Path, source: str) -> tuple[list[Finding], int]:
    """(findings, number of @triton.jit functions) of one file's source."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        return [Finding(path, err.lineno or 0, BLOCK, "parse", f"does not parse: {err.msg}")], 0
    jitted = [fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and is_jit(fn)]
    findings = [*_name_rules(path, tree), *_call_rules(path, tree),
                *(f for fn in jitted for f in _kernel_rules(path, fn)),
                *_launch_rules(path, tree, {fn.name for fn in jitted})]
    return sorted(findings, key=lambda f: (f.line, f.rule)), len(jitted)


def lint(paths: list[Path]) -> tuple[list[Finding], int, int]:
    """(findings, jit functions, files) over the .py files under `paths`."""
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py"))})
    findings, kernels = [], 0
    for f in files:
        found, n = lint_source(f, f.read_text())
        findings += found
        kernels += n
    return findings, kernels, len(files)


KERNELS = Path(__file__).resolve().parents[1] / "qwen_vl_triton" / "kernels"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="*", type=Path, default=[KERNELS],
                        help="kernel files or folders (default: the package's, qwen_vl_triton/kernels)")
    args = parser.parse_args(argv)
    findings, kernels, files = lint(args.paths)
    for f in findings:
        print(f)
    blockers = sum(f.level == BLOCK for f in findings)
    print(f"{kernels} jit functions in {files} files: {blockers} blockers, {len(findings) - blockers} warnings")
    return 1 if blockers or not kernels else 0


if __name__ == "__main__":
    sys.exit(main())
