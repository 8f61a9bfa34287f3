"""A Triton driver that compiles for a chip this machine does not have and launches nothing.

Triton asks its active driver for the target, the device and the stream, compiles for that
target, then asks the driver to load the binary and for a launcher. This driver answers with the
target under check, loads nothing, and its launcher records each launch (the compiled kernel)
instead of running it. The JIT path up to the launch is Triton's own, so a kernel compiled here is compiled
exactly as a launch on that device would compile it (same specialisation, options and stages).
Works with stock Triton (3.x) and triton-ascend (3.2).
"""

from __future__ import annotations

import dataclasses

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as active_driver


@dataclasses.dataclass
class RecordedLaunch:
    """One launch as the driver saw it: the compiled kernel's name and its metadata."""

    kernel: str
    metadata: object


class _Utils:
    """The `driver.utils` of the compile-only driver: no binary is loaded."""

    def __init__(self, max_shared_bytes: int):
        self.max_shared_bytes = max_shared_bytes

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills[, n_max_threads]): a non-None module marks the
        # handles as initialised; the resource figures come from the compiler's own report.
        return (name, name, 0, 0, 1024)[: 5 if _LOADS_MAX_THREADS else 4]

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": self.max_shared_bytes, "multiprocessor_count": 1}


try:  # stock Triton 3.9 (it has `knobs`) loads 5 values, with n_max_threads; triton-ascend 3.2 loads 4.
    from triton import knobs  # noqa: F401

    _LOADS_MAX_THREADS = True
except ImportError:
    _LOADS_MAX_THREADS = False


class CompileOnlyDriver:
    """The active driver while the compile check runs: target `target`, launches recorded."""

    def __init__(self, target: GPUTarget, max_shared_bytes: int):
        self.target = target
        self.utils = _Utils(max_shared_bytes)
        self.launches: list[RecordedLaunch] = []
        self.on_new_kernel = None  # called with (src, metadata) when a compiled kernel is first loaded

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("the compile-only driver runs nothing")

    def launcher_cls(self, src, metadata):
        if self.on_new_kernel is not None:
            self.on_new_kernel(src, metadata)

        def launch(*args):
            # Into the driver active now: a kernel compiled under an earlier one keeps this closure.
            active_driver.active.launches.append(RecordedLaunch(metadata.name, metadata))

        return launch


def install_compile_only(target: GPUTarget, max_shared_bytes: int) -> CompileOnlyDriver:
    """Make a CompileOnlyDriver Triton's active driver for the rest of this process. There is no
    way back: Triton's default driver would look for a GPU, and Triton caches compiled kernels per
    device, so a process compiles for one target only (the check runs one process per target)."""
    drv = CompileOnlyDriver(target, max_shared_bytes)
    active_driver.set_active(drv)
    return drv
