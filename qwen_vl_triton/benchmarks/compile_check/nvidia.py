"""NVIDIA: compile for sm_80 / sm_90 with stock Triton, then read what ptxas reports.

Triton compiles each kernel to PTX and runs ptxas itself (a failure there raises). For the figures,
the PTX is assembled once more with the same ptxas Triton chose for the arch and `-v`, which
reports registers, spill stores/loads and the stack frame. Shared memory is Triton's own figure;
Triton itself refuses a kernel over the arch's limit when it is loaded (OutOfResources).

Theoretical programs per SM follow the CUDA occupancy rules: registers are allocated per warp in
units of 256 out of 64K per SM, at most 64 resident warps and 32 blocks, and shared memory per SM
(164 KB on sm_80, 228 KB on sm_90) with 1 KB reserved per block.
"""

from __future__ import annotations

import re
import subprocess
import tempfile

from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime.cache import get_cache_manager

from qwen_vl_triton.benchmarks.compile_check.report import KernelResources, programs_per_sm

SHARED_PER_SM = {80: 167936, 90: 233472}


def gpu_target(capability: int) -> GPUTarget:
    return GPUTarget("cuda", capability, 32)


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_report(ptx: str, capability: int) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from `ptxas -v`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/kernel.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", f"{tmp}/kernel.cubin"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(_USED.search(log).group(1))
    spill = _SPILL.search(log)
    stack = _STACK.search(log)
    return (regs, int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0,
            int(stack.group(1)) if stack else 0)


def kernel_resources(metadata, capability: int, shared_limit: int) -> KernelResources:
    """The resources of one compiled kernel (its PTX read back from Triton's cache); shared
    memory is checked against `shared_limit` (the target's per-block opt-in maximum)."""
    ptx_path = get_cache_manager(metadata.hash).get_file(f"{metadata.name}.ptx")
    with open(ptx_path) as f:
        ptx = f.read()
    regs, spill_stores, spill_loads, stack = ptxas_report(ptx, capability)
    return KernelResources(
        registers=regs, spill_stores=spill_stores, spill_loads=spill_loads, stack=stack,
        shared=int(metadata.shared), warps=int(metadata.num_warps), stages=int(metadata.num_stages),
        programs_per_core=programs_per_sm(regs, int(metadata.num_warps), int(metadata.shared),
                                          SHARED_PER_SM[capability]),
        limit_shared=shared_limit)
