"""Compile every launch for one target and collect what each compiled kernel needs.

Run in the venv whose Triton builds for the target (stock Triton for sm_*, triton-ascend for
Ascend*), one target per process: Triton keeps one compiled-kernel cache per device, and here every
target is device 0 (see driver.install_compile_only).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from qwen_vl_triton.benchmarks.compile_check.driver import install_compile_only
from qwen_vl_triton.benchmarks.compile_check.launches import Launch, all_launches, plan_launches
from qwen_vl_triton.benchmarks.compile_check.report import KernelResources, TargetReport, Variant
from qwen_vl_triton.kernels.target import KNOWN_TARGETS, Target, use_target


def constexpr_text(src) -> str:
    """The kernel's constexpr arguments (upper-case names) as `NAME=value`, from its ASTSource
    (keys are argument indices in Triton 3.9, names in triton-ascend 3.2)."""
    items = []
    for key, value in src.constants.items():
        name = src.fn.arg_names[key[0]] if isinstance(key, tuple) else key
        if name[:1].isupper():
            text = str(value).removeprefix("tl.").removeprefix("triton.language.")
            items.append(f"{name}={text}")
    return " ".join(items)


# The lines of a compile error that say what went wrong, most telling first (bishengir's UB
# overflow names the bits needed; its retry notes do not).
_TELLING = [re.compile(p, re.I) for p in (r"ub overflow, requires", r"overflow", r"error", r"failed|OutOfResources")]


def error_summary(err: BaseException) -> str:
    """The line of a compile error that says what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for pattern in _TELLING:
        pick = next((line for line in lines if pattern.search(line)), None)
        if pick:
            break
    return f"{type(err).__name__}: {(pick or (lines[0] if lines else ''))[:300]}"


# What each kernel compiled in this process needs (Triton compiles a kernel once a process, so a
# later run_target sees its launches but not its compile): hash -> (constexprs, resources, error).
_compiled: dict[str, tuple[str, KernelResources | None, str | None]] = {}


def run_target(target: Target | str, models: list[str] | None = None, ops: list[str] | None = None,
               launches: list[Launch] | None = None) -> TargetReport:
    """Compile `launches` (default: the released models' launches, or those of `models` and
    `ops`, and the target's committed attention plans: launches.plan_launches) for `target` (a
    Target, or the arch of one of KNOWN_TARGETS)."""
    target = KNOWN_TARGETS[target] if isinstance(target, str) else target
    arch = target.arch
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix=f"qvl-compile-{arch}-"))
    try:
        return _run(target, models, ops, launches, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(target: Target, models: list[str] | None, ops: list[str] | None, launches: list[Launch] | None,
         work: Path, started: float) -> TargetReport:
    arch = target.arch
    if target.backend == "cuda":
        from qwen_vl_triton.benchmarks.compile_check import nvidia

        capability = int(arch.removeprefix("sm_"))
        drv = install_compile_only(nvidia.gpu_target(capability), target.on_chip_bytes)

        def resources(metadata) -> KernelResources:
            return nvidia.kernel_resources(metadata, capability, target.on_chip_bytes)
    else:
        from qwen_vl_triton.benchmarks.compile_check import ascend

        # A cached kernel would skip bishengir and with it the UB report: compile afresh.
        os.environ["TRITON_CACHE_DIR"] = str(work / "triton-cache")
        ascend.setup(arch, work)
        from triton.backends.compiler import GPUTarget

        drv = install_compile_only(GPUTarget("npu", arch, 0), target.on_chip_bytes)

        def resources(metadata) -> KernelResources:
            report = ascend.take_result()
            if report is None:
                return None
            return KernelResources(ub_bytes=report["ub_bytes"], limit_ub=target.on_chip_bytes, cube=report["cube"])

    variants: dict[str, Variant] = {}
    errors: dict[tuple[str, str], Variant] = {}
    # The released shapes, and every plan committed for this target at the end of its bucket.
    launch_list = launches if launches is not None else all_launches(models, ops) + plan_launches(target.plans, ops)
    def on_new_kernel(src, metadata) -> None:
        try:
            _compiled[metadata.hash] = (constexpr_text(src), resources(metadata), None)
        except Exception as err:  # a resource report that cannot be read is a failure too
            _compiled[metadata.hash] = (constexpr_text(src), None, error_summary(err))

    drv.on_new_kernel = on_new_kernel
    with use_target(target):
        last_report = time.time()
        for n, launch in enumerate(launch_list):
            if time.time() - last_report > 30:  # progress on long runs
                print(f"  {arch}: {n}/{len(launch_list)} launches, {len(_compiled)} kernels compiled", flush=True)
                last_report = time.time()
            first = len(drv.launches)
            dtype = str(launch.dtype).removeprefix("torch.")
            example = f"{launch.model} {launch.op} {launch.shape}"
            try:
                launch.call()
            except Exception as err:
                summary = error_summary(err)
                v = errors.setdefault((launch.op, summary), Variant(launch.op, "", dtype, error=summary,
                                                                    example=example))
                v.launches += 1
            for rec in drv.launches[first:]:
                v = variants.get(rec.metadata.hash)
                if v is None:
                    text, res, problem = _compiled.get(rec.metadata.hash, ("", None, None))
                    v = variants[rec.metadata.hash] = Variant(rec.metadata.name.split()[0], text, dtype, res, problem,
                                                              example=example)
                v.launches += 1
    return TargetReport(target=arch, backend=target.backend, variants=[*variants.values(), *errors.values()],
                        launches=len(launch_list), seconds=time.time() - started)
