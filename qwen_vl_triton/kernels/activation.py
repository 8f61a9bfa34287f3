"""silu_and_mul: the gated MLP activation silu(gate) * up over a fused [gate | up] projection.

Work items are (row tile, column chunk) pairs: one row (a decode step) spreads its wide
intermediate dimension (e.g. 18944) over many programs of the persistent grid, and narrow rows
are stacked several to a tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.norms import as_rows
from qwen_vl_triton.kernels.target import Work, current_target, rows_per_tile

CHUNK = 2048  # elements of one output chunk: 2 loads + 1 store of 8 KB each in fp32


# Row and chunk counts follow the batch: not specialised (== 1, % 16), so no new compile per size.
@triton.jit(do_not_specialize=["n_rows", "n_chunks"])
def _silu_and_mul_kernel(x_ptr, out_ptr, n_rows, n_cols, x_stride, n_chunks,
                         BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """out[r, c] = silu(x[r, c]) * x[r, n_cols + c]; x rows strided by x_stride, out contiguous.
    A work item is a tile of BLOCK_R rows x BLOCK columns."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_r = tl.arange(0, BLOCK_R)[:, None]
    offs_c = tl.arange(0, BLOCK)[None, :]
    for item in range(pid, tl.cdiv(n_rows, BLOCK_R) * n_chunks, nprog):
        rows = (item // n_chunks) * BLOCK_R + offs_r
        cols = (item % n_chunks) * BLOCK + offs_c
        mask = (rows < n_rows) & (cols < n_cols)
        rows = rows.to(tl.int64)
        gate = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + rows * x_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + rows * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :N]) * x[..., N:] in fp32, returned in x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@_backend.op(reference=silu_and_mul_reference)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] (fp32/fp16/bf16) -> silu(x[..., :N]) * x[..., N:], [..., N] in x.dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (gate | up), got {x.shape[-1]}")
    n = x.shape[-1] // 2
    rows = as_rows(x)
    out = _backend.empty_output((*x.shape[:-1], n), x.dtype, x.device)
    block = min(triton.next_power_of_2(max(n, 1)), CHUNK)
    n_chunks = triton.cdiv(n, block)
    n_rows = rows.shape[0]
    target = current_target(x.device)
    plan = target.row_plan("silu_and_mul", n, n_rows)  # the device's plan (kernels/plans.py) or the defaults
    block_rows = rows_per_tile(n_rows, block, target, plan=plan)
    grid = (target.grid(triton.cdiv(n_rows, block_rows) * n_chunks, Work.ROWS, plan.programs_per_core),)
    _silu_and_mul_kernel[grid](rows, out, n_rows, n, rows.stride(0), n_chunks, BLOCK_R=block_rows, BLOCK=block,
                               num_warps=target.row_warps(block_rows * block, plan))
    return out
