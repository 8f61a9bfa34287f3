"""Compile every kernel launch of the released checkpoints for NVIDIA sm_80 / sm_90 and Ascend
910B / A3, with no GPU or NPU, and fail on any compile error, NVIDIA spill or shared memory over
the limit, or Ascend UB overflow.

    python -m benchmarks.compile_check                  # all four targets, tables into benchmarks/results
    python -m benchmarks.compile_check --targets sm_90  # one
    python -m benchmarks.compile_check --one sm_90 --json FILE   # one target in this process

NVIDIA targets compile in this interpreter (stock Triton); Ascend targets in --ascend-python
(a venv with triton-ascend and ascendnpu-ir: `make compile-check` makes .venv-ascend). Each target
runs in its own process, --jobs at a time. Writes benchmarks/results/compile-<target>.md (the
standing resource table) and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen_vl_triton.benchmarks import CHECKOUT as REPO
from qwen_vl_triton.benchmarks import RESULTS_DIR

ALL_TARGETS = ("sm_80", "sm_90", "Ascend910B3", "Ascend910_9392")


def _run_one(arch: str, json_path: str, models: list[str] | None, ops: list[str] | None) -> int:
    from qwen_vl_triton.benchmarks.compile_check.check import run_target

    report = run_target(arch, models, ops)
    Path(json_path).write_text(json.dumps(report.to_json()))
    print(report.summary(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"comma-separated targets (default: {','.join(ALL_TARGETS)})")
    parser.add_argument("--ascend-python", default=str(REPO / ".venv-ascend" / "bin" / "python"),
                        help="python of the triton-ascend venv (default: .venv-ascend)")
    parser.add_argument("--models", default=None,
                        help="comma-separated checkpoint names of benchmarks/model_shapes.json (default: all)")
    parser.add_argument("--ops", default=None,
                        help="comma-separated public ops to compile, e.g. rms_norm,paged_attention (default: all)")
    parser.add_argument("--out", default=str(RESULTS_DIR),
                        help="where compile-<target>.md/.json go (default: benchmarks/results)")
    parser.add_argument("--jobs", type=int, default=2, help="targets compiled at once (default 2)")
    parser.add_argument("--one", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else None
    ops = args.ops.split(",") if args.ops else None
    if args.one:
        return _run_one(args.one, args.json, models, ops)

    from qwen_vl_triton.benchmarks.compile_check.report import TargetReport

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(ALL_TARGETS)}")
    if any(t.startswith("Ascend") for t in targets) and not Path(args.ascend_python).exists():
        parser.error(f"{args.ascend_python} does not exist: run `make compile-check` (it makes .venv-ascend) "
                     "or pass --ascend-python")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qvl-compile-check-"))
    queue = list(targets)
    running: dict[str, subprocess.Popen] = {}
    started = time.time()
    codes = {}
    while queue or running:
        while queue and len(running) < max(1, args.jobs):
            arch = queue.pop(0)
            python = sys.executable if arch.startswith("sm_") else args.ascend_python
            cmd = [python, "-m", "qwen_vl_triton.benchmarks.compile_check", "--one", arch,
                   "--json", str(tmp / f"{arch}.json")]
            for flag, values in (("--models", models), ("--ops", ops)):
                if values:
                    cmd += [flag, ",".join(values)]
            print(f"compiling for {arch} ...", flush=True)
            running[arch] = subprocess.Popen(cmd, cwd=REPO)
        time.sleep(0.5)
        for arch, proc in list(running.items()):
            if proc.poll() is not None:
                codes[arch] = proc.returncode
                del running[arch]
    failed = False
    for arch in targets:
        path = tmp / f"{arch}.json"
        if codes.get(arch) != 0 or not path.exists():
            print(f"FAIL {arch}: the check itself failed (exit {codes.get(arch)})")
            failed = True
            continue
        report = TargetReport.from_json(json.loads(path.read_text()))
        (out / f"compile-{arch}.md").write_text(report.markdown())
        (out / f"compile-{arch}.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
        for v in report.failures():
            print(f"FAIL {arch} {v.kernel} {v.constexprs} {v.dtype}: {'; '.join(v.problems())} "
                  f"({v.launches} launches, e.g. {v.example})")
            failed = True
        print(report.summary())
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"compile check {'FAILED' if failed else 'passed'} in {time.time() - started:.0f} s; "
          f"tables in {out}/compile-<target>.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
