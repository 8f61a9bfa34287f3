"""The device the kernels launch on, described once: every launcher sizes its grid, tiles and
launch options from a `Target`, never from `device.type` checks of its own.

A Target says what the chip has (cores by kind, the per-program on-chip budget) and how this
project launches on it (programs per core for each kind of work, warps and pipeline stages, the
operand dtype of tl.dot). `current_target(device)` reads it from the device once; `use_target`
makes the launchers plan for another target, which is how the compile check
(`make compile-check`) compiles the production launches for chips this machine does not have, and
how tests run other tile plans (tests/helpers.tile_plans) through the CPU interpreter.

Kinds of work (`Work`):
  ROWS       element-wise / row reductions (norms, rotary, activation): vector cores;
  COPY       memory-bound copies (the KV-cache write): vector cores, more programs per GPU SM;
  ATTENTION  tl.dot-heavy attention tiles: cube (AI) cores on Ascend, SMs on CUDA.
Ascend pays per launched program and runs one at a time per core: one program per core. A GPU SM
keeps several programs resident to hide memory latency.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels.plans import AttentionPlan, PlanTable, RowPlan, committed_plans


class Work(enum.Enum):
    """What a kernel's programs spend their time on (decides the cores and programs per core)."""

    ROWS = "rows"
    COPY = "copy"
    ATTENTION = "attention"


@dataclasses.dataclass(frozen=True)
class Target:
    """One device as the launchers see it.

    backend: "cuda", "npu", or "interpreter" (Triton's CPU interpreter, TRITON_INTERPRET=1).
    arch: "sm_90", "Ascend910B3", ... ("cpu" for the interpreter).
    vector_cores / cube_cores: Ascend AIV / AIC cores; CUDA SMs for both.
    on_chip_bytes: what one program may keep on chip: Ascend's unified buffer (192 KB on 910B/A3),
      CUDA's opt-in shared memory per block.
    programs_per_core: persistent programs per core for each Work kind.
    attention_warps / attention_stages: num_warps / num_stages of the attention kernels (CUDA;
      attention_options doubles the warps for the largest tiles).
    query_rows: rows of an attention query tile (queries x padded query heads of one kv head).
    key_tile / decode_key_tile: the most keys a prefill / decode attention program scores at
      once (the K/V tile rows); a larger cache block is walked in pieces. With query_rows, sized
      so that a tile of head dim 128 stays in registers (CUDA) or the unified buffer (Ascend).
    plans: the device's committed plans (kernels/plans.py; attention_plan and row_plan read
      them), empty for a device without a file: then query_rows, key_tile / decode_key_tile and
      attention_options' rule are every attention launch's plan, and TILE_ELEMENTS,
      programs_per_core[Work.ROWS] and row_warps' rule every row launch's.
    int8_store_tile: the widest row chunk the quantize ops (per token, per tensor) store as int8 at once:
      bishengir plans ~0.5 KB of UB a column for that path (127 KB at 256 columns; 1024-column
      tiles overflow), so Ascend takes 256; 4096 elsewhere.
    interpret: kernels run in the CPU interpreter: tl.dot operands are fp32 there (it computes
      bf16 dots wrongly), whatever the tile plan.
    """

    backend: str
    arch: str
    vector_cores: int
    cube_cores: int
    on_chip_bytes: int
    programs_per_core: dict[Work, int]
    attention_warps: int = 4
    attention_stages: int = 2
    query_rows: int = 64
    key_tile: int = 64
    decode_key_tile: int = 64
    int8_store_tile: int = 4096
    interpret: bool = False
    plans: PlanTable = PlanTable()

    def cores(self, work: Work) -> int:
        return self.cube_cores if work is Work.ATTENTION else self.vector_cores

    def grid(self, work_items: int, work: Work, per_core: int | None = None) -> int:
        """Programs of a persistent grid over `work_items` rows/tiles (each program loops):
        `per_core` (default programs_per_core[work]) programs on each core of that kind."""
        per_core = per_core or self.programs_per_core[work]
        return max(1, min(work_items, self.cores(work) * per_core, 65535))

    def dot_dtype(self, dtype: torch.dtype) -> tl.dtype:
        """tl.dot operand dtype: the input's own on a device (tensor cores / cube units), fp32 in
        the interpreter, which computes bf16 dots wrongly."""
        if self.interpret or dtype == torch.float32:
            return tl.float32
        return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]

    def attention_plan(self, op: str, head_dim: int, tokens: int) -> AttentionPlan:
        """The tiles of one attention launch (op: one of kernels.plans.OPS; tokens: its query
        tokens, as kernels/plans.py says): this device's committed plan for it, else the defaults."""
        entry = self.plans.lookup(op, head_dim, tokens)
        if entry is not None:
            return entry.plan
        return AttentionPlan(self.query_rows, self.decode_key_tile if op == "paged_decode" else self.key_tile)

    def row_plan(self, op: str, width: int, rows: int) -> RowPlan:
        """The launch of a row op (kernels.plans.ROW_OPS) over `rows` rows of `width` elements:
        this device's committed plan for it, else the defaults."""
        entry = self.plans.lookup(op, width, rows)
        if entry is not None:
            return entry.plan
        return RowPlan(TILE_ELEMENTS, self.programs_per_core[Work.ROWS])

    def attention_options(self, block_m: int, block_d: int, plan: AttentionPlan | None = None) -> dict:
        """num_warps / num_stages of an attention launch with a [block_m, block_d] query tile
        (CUDA; Ascend picks its own): the plan's, else attention_stages and this rule: a 64 x 128
        query tile gets twice attention_warps: at 4 warps its fp32 accumulator, the query and the
        K/V fragments need 255 registers a thread and spill (ptxas, sm_80 and sm_90 at 32-key
        tiles); smaller tiles fit 4 warps, and at 8 ptxas spills them at 80-128 registers instead."""
        if self.backend != "cuda":
            return {}
        warps = self.attention_warps * (2 if block_m * block_d >= 64 * 128 else 1)
        stages = self.attention_stages
        if plan is not None:
            warps, stages = plan.num_warps or warps, plan.num_stages or stages
        return {"num_warps": warps, "num_stages": stages}

    def row_warps(self, block_elements: int, plan: RowPlan | None = None) -> int:
        """num_warps of a ROWS/COPY program whose widest tile has `block_elements` elements
        (ignored on Ascend): the plan's, else 8 from 4096 elements, 4 from 1024, else 2."""
        if plan is not None and plan.num_warps is not None:
            return plan.num_warps
        return 8 if block_elements >= 4096 else 4 if block_elements >= 1024 else 2


def _gpu_per_core(rows: int = 4, copy: int = 8, attention: int = 4) -> dict[Work, int]:
    return {Work.ROWS: rows, Work.COPY: copy, Work.ATTENTION: attention}


_ONE_PER_CORE = {Work.ROWS: 1, Work.COPY: 1, Work.ATTENTION: 1}
ASCEND_UB_BYTES = 192 * 1024  # the unified buffer of a 910B / A3 vector core

# The CPU interpreter: few programs, each looping over several rows/tiles, so test grids stay
# cheap but still exercise the in-kernel loops.
INTERPRETER = Target(backend="interpreter", arch="cpu", vector_cores=4, cube_cores=4,
                     on_chip_bytes=ASCEND_UB_BYTES, programs_per_core=_ONE_PER_CORE, interpret=True)


def cuda_target(capability: int, sms: int, shared_bytes: int) -> Target:
    """An NVIDIA GPU of compute capability `capability` (80, 90, ...) with `sms` SMs.

    Attention scores 32 keys at a time (ptxas -v, head dim 128): with 64-key tiles a 32-row query
    tile needs 250-255 registers at 4 warps on sm_80 and sm_90, a 64-row one up to 255 at 8 warps
    on sm_80, and a decode tile spills 8 bytes; with 32-key tiles no attention kernel passes 184.
    """
    arch = f"sm_{capability}"
    return Target(backend="cuda", arch=arch, vector_cores=sms, cube_cores=sms, on_chip_bytes=shared_bytes,
                  programs_per_core=_gpu_per_core(), key_tile=32, decode_key_tile=32, plans=committed_plans(arch))


def ascend_target(arch: str, ai_cores: int, vector_cores: int) -> Target:
    """An Ascend NPU (arch as bishengir names it, e.g. "Ascend910B3", "Ascend910_9392")."""
    return Target(backend="npu", arch=arch, vector_cores=vector_cores, cube_cores=ai_cores,
                  on_chip_bytes=ASCEND_UB_BYTES, programs_per_core=_ONE_PER_CORE, int8_store_tile=256,
                  plans=committed_plans(arch))


# The chips the compile check builds for (`make compile-check`); core counts as the devices report.
A100 = cuda_target(80, sms=108, shared_bytes=166912)
H100 = cuda_target(90, sms=132, shared_bytes=232448)
ASCEND_910B3 = ascend_target("Ascend910B3", ai_cores=20, vector_cores=40)
ASCEND_A3 = ascend_target("Ascend910_9392", ai_cores=24, vector_cores=48)
KNOWN_TARGETS = {t.arch: t for t in (A100, H100, ASCEND_910B3, ASCEND_A3)}


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _device_target(device_type: str, index: int) -> Target:
    # Triton's own driver answers for both backends: the arch it compiles for (a compute
    # capability on CUDA, the chip's name on Ascend) and the core counts.
    driver = triton.runtime.driver.active
    props = driver.utils.get_device_properties(index)
    arch = driver.get_current_target().arch
    if device_type == "npu":
        return ascend_target(str(arch), int(props["num_aicore"]), int(props["num_vectorcore"]))
    return cuda_target(int(arch), int(props["multiprocessor_count"]), int(props["max_shared_mem"]))


_forced: contextvars.ContextVar[Target | None] = contextvars.ContextVar("qvl_target", default=None)


@contextlib.contextmanager
def use_target(target: Target) -> Iterator[Target]:
    """Within the block, launchers plan for `target` whatever device their tensors are on."""
    token = _forced.set(target)
    try:
        yield target
    finally:
        _forced.reset(token)


def current_target(device: torch.device) -> Target:
    """The Target launches on `device` plan for: the one set by `use_target`, else the
    interpreter for CPU tensors (or TRITON_INTERPRET=1), else the device's own, read once."""
    forced = _forced.get()
    if forced is not None:
        return forced
    if device.type == "cpu" or interpreting():
        return INTERPRETER
    return _device_target(device.type, device.index if device.index is not None else 0)


# Narrow rows are stacked into tiles of about this many elements: few enough to stay on chip
# (16 KB of fp32 per live tile), enough that each loop iteration has real work.
TILE_ELEMENTS = 4096


def rows_per_tile(n_rows: int, row_elements: int, target: Target, work: Work = Work.ROWS,
                  plan: RowPlan | None = None) -> int:
    """Rows stacked in one tile (a power of two): as many as fit TILE_ELEMENTS (the plan's
    tile_elements) for rows padded to `row_elements` (a power of two), but no more than keeps
    every program of the grid busy."""
    fit = max(1, (plan.tile_elements if plan else TILE_ELEMENTS) // row_elements)
    per_program = triton.cdiv(n_rows, target.grid(n_rows, work, plan.programs_per_core if plan else None))
    return min(fit, triton.next_power_of_2(per_program))
