"""`make device-check`: the prepared run for the day an NVIDIA GPU is at hand (about 9 minutes).

1. the kernel tests on the GPU (pytest tests/kernels, compiled kernels, no interpreter);
2. a short attention tuning sweep (`make tune` with a 2-minute budget, benchmarks/tune.py): the
   device's plan file, qwen_vl_triton/kernels/plans/<arch>.json, which the benches then use
   (commit it; a longer `make tune` refines it);
3. a short `make bench` (the element-wise and attention families at full shapes against SDPA,
   gather + SDPA, eager and torch.compile, and the engine end to end at Qwen2.5-VL-7B shapes,
   batch 64 image requests, against transformers' generate), the int8 linear
   layers (family int8: int8_matmul / w8a16_matmul against torch._int_mm, dequantize + matmul and
   the bf16 GEMM), then decode steps eager against captured graphs at batch 1/8/32/64 (their
   test, and benchmarks/bench_decode_graphs.py);
4. the static resource table of `make compile-check` against the device: the launches of two
   checkpoints are compiled by the real CUDA driver (launches recorded, not run), which reports
   each kernel's registers and local (spill) memory as loaded on this GPU; programs per SM follow
   from those and the device's own limits; each row sits beside benchmarks/results/compile-sm_XX.json.

Writes benchmarks/results/device-check-<gpu>.md (and the bench's own results files, and the
pytest log as device-check-<gpu>-pytest.log). Exits non-zero if a step failed.

It runs with the machine's own Python (DEVICE_PY), which needs a CUDA build of torch and triton:
without them it says what to install, before any step (this module imports neither at its top).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

from qwen_vl_triton.benchmarks import CHECKOUT as REPO
from qwen_vl_triton.benchmarks import RESULTS_DIR as RESULTS

REQUIRED_MODULES = ("torch", "triton")


def missing_modules() -> list[str]:
    """Each of REQUIRED_MODULES this interpreter cannot import, with the reason ('torch (No module
    named 'torch')'). Importing, not just finding, catches a broken install too (a CUDA library
    torch cannot load)."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except (ImportError, OSError) as e:
            missing.append(f"{name} ({e})")
    return missing


def requirements_message(missing: list[str]) -> str:
    """What to install, or which interpreter to pick, when `missing` modules cannot be imported."""
    return (f"device-check cannot run with {sys.executable}: it cannot import {', '.join(missing)}.\n"
            "Install into that interpreter a CUDA build of torch that matches this machine's NVIDIA driver "
            "(nvidia-smi shows the newest CUDA version the driver supports; https://pytorch.org/get-started/locally/ "
            "gives the pip command for it) and triton (the Linux CUDA wheels of torch bring a matching one).\n"
            "Or run the check with another interpreter that has both: DEVICE_PY=/path/to/python make device-check")


def _step(name: str, cmd: list[str], timeout: int, log: Path) -> tuple[bool, float]:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    started = time.time()
    try:
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        ok, text = run.returncode == 0, run.stdout + run.stderr
    except subprocess.TimeoutExpired as err:
        ok, text = False, f"{err.stdout or ''}{err.stderr or ''}\nTIMED OUT after {timeout} s"
    log.write_text(text if isinstance(text, str) else text.decode())
    print(text[-2000:] if isinstance(text, str) else "", flush=True)
    return ok, time.time() - started


def measured_resources(models: list[str]) -> list[dict]:
    """Compile the launches of `models` on this GPU through the real driver, launching nothing;
    one row per compiled kernel with what the driver reports."""
    import torch
    from triton.runtime import driver

    from qwen_vl_triton.benchmarks.compile_check.check import constexpr_text
    from qwen_vl_triton.benchmarks.compile_check.launches import all_launches
    from qwen_vl_triton.benchmarks.compile_check.report import programs_per_sm
    from qwen_vl_triton.kernels.target import current_target, use_target

    real = driver.active
    props = torch.cuda.get_device_properties(0)
    rows: dict[str, dict] = {}

    class Recording:  # the real driver in every respect but the launch itself
        def __getattr__(self, name):
            return getattr(real, name)

        def launcher_cls(self, src, metadata):
            def record(*args):
                pass

            rows.setdefault(metadata.hash, {"kernel": metadata.name, "constexprs": constexpr_text(src),
                                            "warps": metadata.num_warps, "shared": metadata.shared})
            return record

    target = current_target(torch.device("cuda", 0))
    driver.set_active(Recording())
    try:
        with use_target(target):
            for launch in all_launches(models):
                launch.call()  # meta tensors: the launcher plans, the driver compiles and loads
    finally:
        driver.set_active(real)
    # The loaded kernels (every kernel module is imported by now): registers and spills as the
    # CUDA driver reports them.
    from triton.runtime.jit import JITFunction

    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("qwen_vl_triton.kernels."):
            continue
        for fn in vars(module).values():
            if not isinstance(fn, JITFunction):
                continue
            for cache in fn.device_caches.values():
                for compiled in cache[0].values():
                    row = rows.get(compiled.hash)
                    if row is None:
                        continue
                    row.update(registers=compiled.n_regs, spills=compiled.n_spills)
                    row["programs_per_sm"] = programs_per_sm(
                        compiled.n_regs, row["warps"], row["shared"],
                        getattr(props, "shared_memory_per_multiprocessor", 233472),
                        getattr(props, "regs_per_multiprocessor", 65536),
                        getattr(props, "max_threads_per_multi_processor", 2048))
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    """Run the steps (module docstring); 0 if all passed, 1 if one failed, 2 if none could run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--models", default="Qwen2.5-VL-7B,Qwen2.5-VL-72B",
                        help="checkpoints whose launches are compared with the static table")
    args = parser.parse_args(argv)
    missing = missing_modules()
    if missing:
        print(requirements_message(missing), file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("device-check needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        return 2
    name = torch.cuda.get_device_name(0).replace(" ", "-")
    major, minor = torch.cuda.get_device_capability(0)
    arch = f"sm_{10 * major + minor}"
    started = time.time()
    tests_ok, tests_s = _step("kernel tests on the GPU",
                              [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/kernels"],
                              210, RESULTS / f"device-check-{name}-pytest.log")
    tune_ok, tune_s = _step("attention tuning (2 min)", [sys.executable, "benchmarks/tune.py", "--max-minutes", "2"],
                            240, RESULTS / f"device-check-{name}-tune.log")
    bench_ok, bench_s = _step("short bench", [sys.executable, "benchmarks/run_all.py", "--only", "elementwise",
                                              "--only", "attention", "--only", "e2e"], 240,
                              RESULTS / f"device-check-{name}-bench.log")
    int8_ok, int8_s = _step("int8 bench", [sys.executable, "benchmarks/run_all.py", "--only", "int8"], 180,
                            RESULTS / f"device-check-{name}-int8-bench.log")
    graphs_ok, graphs_s = _step("decode graphs", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                  "tests/engine/test_decode_graphs.py", "-k", "captured"], 120,
                                RESULTS / f"device-check-{name}-graphs.log")
    graphs_ok &= _step("decode graphs bench", [sys.executable, "benchmarks/bench_decode_graphs.py"], 150,
                       RESULTS / f"device-check-{name}-graphs-bench.log")[0]
    measured = measured_resources(args.models.split(","))
    static_path = RESULTS / f"compile-{arch}.json"
    static = {}
    if static_path.exists():
        for v in json.loads(static_path.read_text())["variants"]:
            if v["resources"]:
                static[(v["kernel"], v["constexprs"])] = v["resources"]
    lines = [f"# Device check: {torch.cuda.get_device_name(0)} ({arch})", "",
             f"Kernel tests on the GPU: {'passed' if tests_ok else 'FAILED'} ({tests_s:.0f} s). "
             f"Attention tuning (plans/{arch}.json, tune-{name}.md): {'done' if tune_ok else 'FAILED'} "
             f"({tune_s:.0f} s). Short bench: {'done' if bench_ok else 'FAILED'} ({bench_s:.0f} s). Int8 bench: "
             f"{'done' if int8_ok else 'FAILED'} ({int8_s:.0f} s). Decode graphs (test, then "
             f"bench: device-check-{name}-graphs*.log): {'passed' if graphs_ok else 'FAILED'} ({graphs_s:.0f} s). "
             f"Total {time.time() - started:.0f} s.",
             "", f"Registers and spills as the CUDA driver reports them for the kernels loaded on this GPU, "
             f"beside the static figures of {static_path.name} (ptxas on this machine's CPU).", "",
             "| kernel | constexprs | registers (static / device) | spills B (static / device) | "
             "programs/SM (static / device) |", "|---|---|---|---|---|"]
    mismatches = 0
    for row in sorted(measured, key=lambda r: (r["kernel"], r["constexprs"])):
        s = static.get((row["kernel"], row["constexprs"]), {})
        same = s.get("registers") == row.get("registers")
        mismatches += not same
        lines.append(f"| {row['kernel']} | {row['constexprs']} | {s.get('registers', '-')} / {row.get('registers')} | "
                     f"{s.get('spill_stores', '-')} / {row.get('spills')} | "
                     f"{s.get('programs_per_core', '-')} / {row.get('programs_per_sm')} |")
    lines.insert(4, f"{len(measured)} kernels compared; {mismatches} differ in registers from the static table.")
    out = RESULTS / f"device-check-{name}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0 if tests_ok and tune_ok and bench_ok and int8_ok and graphs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
