"""Device facts the launchers size their grids from, read once per device.

Ascend and GPUs both want a grid of about the number of cores with a loop inside each program
(Ascend pays per launched program). The CPU interpreter has no driver to ask: it gets a small
constant so that test grids stay cheap but still exercise the in-kernel loops.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETER_PROGRAMS = 4  # CPU interpreter: few programs, each looping over several rows/tiles


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _properties(device_type: str, index: int) -> dict:
    return dict(triton.runtime.driver.active.utils.get_device_properties(index))


def num_cores(device: torch.device, kind: str = "vector") -> int:
    """Cores to size a persistent grid by.

    kind="vector": element-wise/reduction work (Ascend vector cores, CUDA SMs);
    kind="cube": matmul-heavy work (Ascend AI cores, CUDA SMs).
    """
    if device.type == "cpu" or interpreting():
        return INTERPRETER_PROGRAMS
    props = _properties(device.type, device.index if device.index is not None else 0)
    if device.type == "npu":
        return int(props["num_vectorcore"] if kind == "vector" else props["num_aicore"])
    return int(props["multiprocessor_count"])


# Programs per core of a persistent grid. Ascend pays per launched program: one per core. A GPU SM
# holds several resident programs and needs them to hide memory latency in bandwidth-bound loops.
_PROGRAMS_PER_CORE = {"cuda": 4, "npu": 1}


def persistent_grid(work_items: int, device: torch.device, kind: str = "vector",
                    programs_per_core: int | None = None) -> int:
    """Programs for a grid that loops over `work_items` rows/tiles inside each program."""
    if programs_per_core is None:
        programs_per_core = _PROGRAMS_PER_CORE.get(device.type, 1)
    return max(1, min(work_items, num_cores(device, kind) * programs_per_core, 65535))


# Narrow rows are stacked into tiles of about this many elements: few enough to stay on chip
# (16 KB of fp32 per live tile), enough that each loop iteration has real work.
TILE_ELEMENTS = 4096


def rows_per_tile(n_rows: int, row_elements: int, device: torch.device) -> int:
    """Rows stacked in one tile (a power of two): as many as fit TILE_ELEMENTS for rows padded to
    `row_elements` (a power of two), but no more than keeps every program of the grid busy."""
    fit = max(1, TILE_ELEMENTS // row_elements)
    per_program = triton.cdiv(n_rows, persistent_grid(n_rows, device))
    return min(fit, triton.next_power_of_2(per_program))


def num_warps_for(block_elements: int) -> int:
    """Warps for a program whose widest tile has `block_elements` elements (ignored on Ascend)."""
    return 8 if block_elements >= 4096 else 4 if block_elements >= 1024 else 2


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype for tl.dot: the input's own on a device (tensor cores / cube units),
    fp32 in the interpreter, which computes bf16 dots wrongly."""
    if interpreting() or dtype == torch.float32:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
